"""vitfast ops: fused kernels with plain-PyTorch references beside them."""
from .reference import attention_ref, patch_embed_ref, normalize_images_ref  # noqa: F401
from .patch_embed import patch_embed  # noqa: F401
from .attention import attention, attention_packed, attention_not_supported_reasons  # noqa: F401
