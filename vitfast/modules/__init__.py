"""nn.Modules built on vitfast's ops, with timm's parameter names."""
from .layers import DropPath, LayerScale, Mlp  # noqa: F401
from .attention import Attention  # noqa: F401
from .block import Block  # noqa: F401
from .patch_embed import PatchEmbed  # noqa: F401
