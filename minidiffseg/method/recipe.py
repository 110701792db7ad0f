"""The method's settings for one backbone, as data: which attention layers are read and how they are fused,
the prompt, the noise level, the background score (docs/design.md §5).

A `Recipe` is frozen: a variant is `dataclasses.replace(recipe, timesteps=(1, 50, 100))`, which checks
the new values as the constructor does. Each backbone gives its own (`Backbone.recipe`); SD1.5's is the
official one of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError

# Official DiffSegmenter weights per resolution at 512²: 8:0.3, 16:0.5, 32:0.1, 64:0.1 (docs/design.md §5).
# Levels, not pixel sizes: level 8 is the 8×8 map of a 512² image (64×64 latent), level 1 the 64×64 one.
DEFAULT_LEVEL_WEIGHTS = {8: 0.3, 4: 0.5, 2: 0.1, 1: 0.1}
TIMESTEP = 100  # the official single noise level
TEMPLATES = {"photograph": "a photograph of {}", "photography": "a photography of {}"}  # VOC / Context+COCO (§5)
CLASS_WEIGHT = 1.21  # "++": the official recipe's class-word weight (1.1²)
# Background score τ: argmax over [τ, M_1..M_C] (docs/design.md §5). The official code picked the best
# of 0.30..0.74 on the evaluation set itself; ours is a fixed default in the middle of the range the
# official sweep explored, to be replaced by `minidiffseg calibrate` on a held-out split.
DEFAULT_TAU = 0.4
MAX_TIMESTEPS = 8  # one U-Net pass each, and each adds its Q/K to the stored recording
TOKENS = ("last", "all")
TEXT_TOKENS = ("clip", "t5", "both")  # SD3: whose tokens of the class word are read (docs/sd3.md §3)


def check_tau(tau, what: str = "background τ") -> float:
    """τ as a float in [0, 1], or one UserError line naming `what` (e.g. "--tau")."""
    try:
        value = float(tau)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 <= value <= 1:
        raise UserError(f"{what} {tau}: τ is compared with scores in [0, 1]; give a value in [0, 1]")
    return value


def check_timesteps(given, what: str = "timesteps") -> tuple[int, ...]:
    """100, "1,50,100" or (1, 50, 100) -> a tuple of 1..MAX_TIMESTEPS noise levels in 0..999."""
    try:
        values = given.replace(" ", "").split(",") if isinstance(given, str) else \
            [given] if isinstance(given, int) else list(given)
        timesteps = tuple(int(t) for t in values)
    except (TypeError, ValueError):
        timesteps = ()
    if not timesteps or not all(0 <= t < 1000 for t in timesteps) or len(timesteps) > MAX_TIMESTEPS:
        raise UserError(f"{what} {given!r}: give 1 to {MAX_TIMESTEPS} integers in 0..999, e.g. 100 or 1,50,100,150")
    return timesteps


@dataclass(frozen=True)
class Recipe:
    """What DiffSegmenter reads from a backbone and how (the paper's choices for SD1.5 as defaults).

    timesteps:     noise levels whose attention is averaged (official: (100,); paper Table 5 also
                   tries (1, 50, 100, 150))
    template:      prompt template with '{}' (TEMPLATES: "a photograph of {}" VOC, "a photography of {}")
    level_weights: fusion weight per attention level (1 = the finest grid, 64² at 512²; 8 = 8²)
    self_levels:   levels whose self-attention forms S in M = S·A (official: the finest layers only)
    tokens:        "last" (official) or "all" tokens of the class name
    class_weight:  weight on the class's last word ("++" = 1.21; 1.0 disables)
    ing_token:     the official "-ing" rule: when the word right after the class name ends in "ing"
                   ("a photograph of a cat sleeping"), its first token joins the class map
    tau:           background score τ: a pixel whose best class score is below it is background
    block_weights: a diffusion transformer (SD3's MM-DiT, one token grid): fusion weight per block, whose joint
                   attention's image × text part gives the cross maps; when given, `level_weights` and
                   `self_levels` (U-Nets') are not read
    self_blocks:   the blocks whose joint attention's image × image part forms S (with `block_weights`)
    renormalise:   divide each row of such an S by its mass on the image keys (the text keys take the rest), so
                   that it sums to 1 as a U-Net's self-attention rows do (docs/sd3.md §3)
    text_tokens:   SD3 (CLIP's 77 text tokens, then T5's): the class word's tokens a map reads and "++" weighs,
                   "clip" (default: the anchors' choice), "t5", or "both" (the two maps averaged)
    """

    timesteps: tuple[int, ...] = (TIMESTEP,)
    template: str = TEMPLATES["photograph"]
    level_weights: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_LEVEL_WEIGHTS))
    self_levels: tuple[int, ...] = (1,)
    tokens: str = "last"
    class_weight: float = CLASS_WEIGHT
    ing_token: bool = True
    tau: float = DEFAULT_TAU
    block_weights: dict[int, float] = field(default_factory=dict)
    self_blocks: tuple[int, ...] = ()
    renormalise: bool = True
    text_tokens: str = "clip"

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the given values once, here
        set_(self, "timesteps", check_timesteps(self.timesteps))
        set_(self, "tau", check_tau(self.tau))
        set_(self, "level_weights", {int(k): float(v) for k, v in dict(self.level_weights).items()})
        set_(self, "self_levels", tuple(int(level) for level in self.self_levels))
        set_(self, "block_weights", {int(k): float(v) for k, v in dict(self.block_weights).items()})
        set_(self, "self_blocks", tuple(int(b) for b in self.self_blocks))
        if "{}" not in self.template:
            raise UserError(f"template {self.template!r} has no '{{}}' where the class name goes")
        if self.tokens not in TOKENS:
            raise UserError(f"tokens {self.tokens!r}: use 'last' (official) or 'all'")
        if self.text_tokens not in TEXT_TOKENS:
            raise UserError(f"text_tokens {self.text_tokens!r}: use 'clip' (default), 't5' or 'both'")
        if self.transformer:
            if not self.self_blocks:
                raise UserError("self_blocks is empty: with block_weights (a diffusion transformer) name the blocks "
                                "whose image × image attention forms S, e.g. (9,)")
            return
        if self.self_blocks:
            raise UserError(f"self_blocks {self.self_blocks} without block_weights: a diffusion transformer's recipe "
                            "names both; a U-Net's names level_weights and self_levels")
        if not self.level_weights:
            raise UserError("level_weights is empty: give at least one level's fusion weight")
        if len(set(self.self_levels)) != 1:
            raise UserError(f"self_levels {self.self_levels}: the refinement M = S·A multiplies the maps by the "
                            "self-attention of one grid; give one level, e.g. (1,)")

    @property
    def transformer(self) -> bool:
        """Whether this recipe reads a diffusion transformer's blocks (`block_weights`) rather than U-Net levels."""
        return bool(self.block_weights)

    @property
    def fusion_weights(self) -> dict[int, float]:
        """Fusion weight per group of cross maps: per block (a diffusion transformer) or per level (a U-Net)."""
        return self.block_weights if self.transformer else self.level_weights

    @property
    def prompt_options(self) -> dict:
        """The keyword arguments of the prompt builders (method/prompts.py)."""
        return dict(tokens=self.tokens, class_weight=self.class_weight, ing_token=self.ing_token)


# SDXL (docs/sdxl.md §3): its U-Net attends at two levels only, 2 and 4 (64² and 32² at 1024²; a level's grid
# cell is 8·level pixels at any resolution). Each keeps the paper's weight for the same cell size (16 px: 0.1,
# 32 px: 0.5), so the coarser grid carries the semantics as in the paper; the refinement reads the finest grid.
SDXL_LEVEL_WEIGHTS = {4: DEFAULT_LEVEL_WEIGHTS[4], 2: DEFAULT_LEVEL_WEIGHTS[2]}
SDXL_SELF_LEVELS = (2,)


# SD3 / SD3.5 (docs/sd3.md §3): one token grid (latent / 2), so the maps are fused over blocks. The anchor is the block
# Seg4Diff reads on SD3-medium, transformer_blocks[9] of 24 (its configs/eval_ovss.yaml ATTENTION_LAYERS: [9]), at the
# same relative depth in other depths; both the cross maps and S come from it. The noise is σ = 0.256, the
# signal-to-noise ratio of the paper's DDPM t = 100: ᾱ_100 = 0.8942 (sd/schedule.py), and a flow's x_σ = (1−σ)x0 + σε
# has SNR ((1−σ)/σ)², equal when σ = 1 / (1 + √(ᾱ/(1−ᾱ))) = 0.2559; inside the σ ≈ 0.06–0.43 ELBO-T2IAlign reads.
SD3_ANCHOR_BLOCK, SD3_DEPTH = 9, 24
SD3_TIMESTEP = 256  # 1000·σ


def sd3_anchor(blocks: int) -> int:
    """The block at Seg4Diff's relative depth, 9 of 24 (0-based, so 9/23 of the way), for a transformer of `blocks`."""
    return round(SD3_ANCHOR_BLOCK * (blocks - 1) / (SD3_DEPTH - 1))


def recipe_for(backbone) -> Recipe:
    """The recipe a backbone is segmented with by default, by its `kind`. SD1.x: the paper's. SD2.x: the same
    choices (its U-Net has SD1.5's layout: the same four levels, the finest self-attention at 64² for 512²
    inputs, docs/sd2.md); no ablation on SD2.x has been published. SDXL and SDXL-Turbo: the paper's weights at
    the two levels SDXL has, the refinement at its finest (docs/sdxl.md §3); t = 100 (SDXL's noise schedule is
    SD's), the same prompt template and "++". SD3 / SD3.5: one block's joint attention, at the noise of equal
    signal-to-noise ratio (above)."""
    kind = getattr(backbone, "kind", "sd1")
    if kind in ("sd3", "sd35"):
        blocks = len({m.block for m in backbone.attention_layers() if m.kind == "joint"})
        anchor = sd3_anchor(blocks)
        return Recipe(timesteps=(SD3_TIMESTEP,), level_weights={}, self_levels=(), block_weights={anchor: 1.0},
                      self_blocks=(anchor,))
    if kind in ("sdxl", "sdxl-turbo"):
        return Recipe(level_weights=SDXL_LEVEL_WEIGHTS, self_levels=SDXL_SELF_LEVELS)
    return Recipe()
