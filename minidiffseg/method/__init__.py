"""DiffSegmenter, the paper: "Diffusion Model is Secretly a Training-free Open Vocabulary Semantic Segmenter",
Jinglong Wang, Xiawei Li, Jing Zhang, Qingyuan Xu, Qin Zhou, Qian Yu, Lu Sheng, Dong Xu (arXiv:2309.02773).
Only the method lives here; the networks are in sd/, the dense CRF post-processing in crf/, the class
filter in filter/.

| the paper's step | where |
|---|---|
| prompts: "a photograph of {class}", BLIP captions continuing it | `prompts.template_prompt`, `prompts.user_prompt`, `prompts.joint_prompt` |
| class-token re-weighting "++" (weight 1.21 on the class word's embedding) | `prompts.reweight`, `Segmenter.encode_text`; `Recipe.class_weight` |
| one noising of the image latent at t = 100 | `Segmenter.noises`, `Segmenter.record`; `Recipe.timesteps` |
| cross-attention maps of the class tokens, averaged over heads | `sd/attention.py` `AttentionStore.attend` (recording) |
| fusion over resolutions 8/16/32/64 with weights 0.3/0.5/0.1/0.1 → A | `fusion.fused_map` (the one place A is computed); `Recipe.level_weights` |
| refinement by the 64² self-attention, M = S·A | `refine.refine`, `Segmenter.refine`; `Recipe.self_levels` |
| upsampling, min-max, argmax against the background score τ | `decision.upsample_scores`, `decision.decide`; `Recipe.tau` |
| the whole method, with every intermediate | `Segmenter.run`, `Segmenter.__call__` |
"""
