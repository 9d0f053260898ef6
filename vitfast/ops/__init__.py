"""vitfast ops: fused kernels with plain-PyTorch references beside them.

Importing this package registers every op (``torch.ops.vitfast.*``: the compiled extension's when
it can be used, and the Triton ones) and reads the measured dispatch table, whatever imported it.
"""
from .reference import attention_ref, patch_embed_ref, normalize_images_ref  # noqa: F401
from .patch_embed import patch_embed  # noqa: F401
from .attention import attention, attention_packed, attention_not_supported_reasons  # noqa: F401
from .layer_norm import (add_layer_norm, add_layer_norm_not_supported_reasons, add_layer_norm_ref,  # noqa: F401
                         layer_norm, layer_norm_not_supported_reasons, layer_norm_ref)
from .bias_gelu import bias_gelu, bias_gelu_not_supported_reasons, bias_gelu_ref, linear_bias_gelu  # noqa: F401
from .bias_scale_residual import bias_scale_residual, bias_scale_residual_not_supported_reasons, bias_scale_residual_ref  # noqa: F401

from .. import dispatch as _dispatch_table  # noqa: E402

_dispatch_table.table()  # read now: the ops' choice must never read a file while torch.compile traces
