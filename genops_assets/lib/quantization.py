"""Loading a base model in 4-bit (NF4) or 8-bit through bitsandbytes, for QLoRA training and for
inference.

``to_bnb_config`` is the one place that turns the genops setting (``none | nf4 | int8``, compute
dtype, double quantization) into a ``transformers.BitsAndBytesConfig``; training and serving
both call it. ``require_quantization`` runs before a quantized load: bitsandbytes must be
importable and must actually run a quantized layer on the device (its CPU backend does on
recent releases; on an old release or a build without the device's kernels it does not), else
a ``QuantizationUnavailable`` names the setting that asked for it. A quantized run never falls
back to full precision on its own.
"""

from __future__ import annotations

import functools
from typing import Any

QUANTIZATIONS = ("none", "nf4", "int8")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")


class QuantizationUnavailable(RuntimeError):
    """The configured quantization cannot run on this machine."""


def check_quantization_name(quantization: str, setting: str = "quantization") -> str:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"{setting}: unknown quantization '{quantization}' (use one of {', '.join(QUANTIZATIONS)})")
    return quantization


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute_dtype(compute_dtype: str, device: str):
    """The torch dtype the de-quantized matmuls run in: ``auto`` is bfloat16 on a GPU that has
    it, float32 otherwise."""
    import torch

    if compute_dtype == "auto":
        return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype '{compute_dtype}' (use one of {', '.join(COMPUTE_DTYPES)})")
    return getattr(torch, compute_dtype)


def to_bnb_config(quantization: str, compute_dtype: str = "auto", double_quant: bool = True,
                  device: str | None = None) -> Any:
    """The ``BitsAndBytesConfig`` of a genops quantization setting; None for ``none``.

    nf4: 4-bit NormalFloat weights (the QLoRA paper's data type) de-quantized to
    ``compute_dtype`` for each matmul, with the quantization constants themselves quantized
    when ``double_quant`` (about 0.4 bit per weight less). int8: LLM.int8() weights (outlier
    columns kept in 16 bit); compute dtype and double quantization do not apply.
    """
    check_quantization_name(quantization)
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=resolve_compute_dtype(compute_dtype, device or default_device()),
        bnb_4bit_use_double_quant=double_quant,
    )


@functools.cache
def _probe(quantization: str, device: str) -> str | None:
    """Why bitsandbytes cannot run a ``quantization`` layer on ``device`` (None: it can)."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc})"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    try:
        weight = torch.randn(64, 64)
        if quantization == "nf4":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer = layer.to(device)
        out = layer(torch.randn(2, 64, device=device))
    except Exception as exc:  # bitsandbytes raises RuntimeError, NotImplementedError, ... per backend
        return f"bitsandbytes {bnb.__version__} cannot run a {quantization} layer on {device}: " \
               f"{type(exc).__name__}: {exc}"
    if not bool(torch.isfinite(out).all()):
        return f"bitsandbytes {bnb.__version__} returned non-finite values from a {quantization} layer on {device}"
    return None


def quantization_problem(quantization: str, device: str | None = None) -> str | None:
    """Why ``quantization`` cannot run on ``device`` (default: CUDA when there is one), or None."""
    if check_quantization_name(quantization) == "none":
        return None
    return _probe(quantization, device or default_device())


def require_quantization(quantization: str, setting: str, device: str | None = None) -> None:
    """Raise ``QuantizationUnavailable`` naming ``setting`` when ``quantization`` cannot run here."""
    problem = quantization_problem(quantization, device)
    if problem is not None:
        raise QuantizationUnavailable(
            f"{setting}={quantization!r} needs bitsandbytes running {quantization} layers on "
            f"{device or default_device()}, and here {problem}. Set {setting} to 'none' to run in full precision, "
            f"or run on a machine with a CUDA GPU.")


def quantized_identity(model_digest: str, quantization: str) -> str:
    """The identity of a model as loaded: the folder digest, marked with the quantization when
    there is one (cached answers of the full-precision model are not those of its 4-bit load)."""
    return model_digest if check_quantization_name(quantization) == "none" else f"{model_digest}+{quantization}"
