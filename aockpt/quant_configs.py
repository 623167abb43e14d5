"""torchao configs in config.json: each type's config factory (the torchao 0.18 config that makes a given
tensor). How stock transformers reads a config record back is `stock_configs.stock_refusal`.

Registry rows name the factories (`TensorType.config`); `hf_config` calls them through the rows. A factory
returns None for a tensor no torchao config makes (stock transformers is then told to refuse the folder).
"""

from __future__ import annotations

from typing import Any, Callable

from torchao.quantization import (
    Float8DynamicActivationFloat8WeightConfig,
    Float8WeightOnlyConfig,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8DynamicActivationIntxWeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from torchao.quantization import granularity as _g
from torchao.prototype.mx_formats import (
    MXDynamicActivationMXWeightConfig,
    NVFP4DynamicActivationNVFP4WeightConfig,
    NVFP4WeightOnlyConfig,
)


def int8(t: Any) -> Any:
    """Int8Tensor: weight-only, or with int8 dynamic activations."""
    return Int8WeightOnlyConfig() if t.act_quant_kwargs is None else Int8DynamicActivationInt8WeightConfig()


def float8(t: Any) -> Any:
    """Float8Tensor: weight-only, or with float8 dynamic activations of the same granularity."""
    if t.act_quant_kwargs is None:
        return Float8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=t.act_quant_kwargs.granularity)


def intx(t: Any) -> Any:
    """IntxUnpackedToInt8Tensor: its bit width and group, weight-only or with int8 dynamic activations."""
    group = t.block_size[-1]
    granularity = _g.PerAxis(0) if group == t.shape[-1] else _g.PerGroup(group)
    if t.activation_quantization is None:
        return IntxWeightOnlyConfig(weight_dtype=t.target_dtype, granularity=granularity)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=t.target_dtype, weight_granularity=granularity)


def int4(packing: str) -> Callable[[Any], Any]:
    """An int4 tensor of one packing format: Int4WeightOnlyConfig with its group size."""
    def make(t: Any) -> Any:
        return Int4WeightOnlyConfig(group_size=t.block_size[-1], int4_packing_format=packing)

    return make


def mx(t: Any) -> Any | None:
    """MXTensor: torchao 0.18's one MX config quantizes activations too; a weight-only MXTensor has no config."""
    act = t.act_quant_kwargs
    if act is None:
        return None
    return MXDynamicActivationMXWeightConfig(block_size=t.block_size, activation_dtype=act.elem_dtype,
                                             weight_dtype=t.elem_dtype, kernel_preference=t.kernel_preference,
                                             scaling_mode=act.scaling_mode)


def nvfp4(t: Any) -> Any | None:
    """NVFP4Tensor: weight-only, or with dynamic NVFP4 activations; a statically calibrated one has no config."""
    if t.act_quant_kwargs is None:
        return NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=t.per_tensor_scale is not None)
    if t.act_per_tensor_scale is not None:
        return None
    return NVFP4DynamicActivationNVFP4WeightConfig(
        use_triton_kernel=t.use_triton_kernel,
        use_dynamic_per_tensor_scale=t.act_quant_kwargs.use_dynamic_per_tensor_scale)
