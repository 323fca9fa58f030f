"""The base model: the embedded SmolLM2-135M-Instruct, or any local Hugging Face folder."""


from pathlib import Path

import dagster as dg
from pydantic import Field

from genops_assets.lib.base_model import convert_gguf, find_embedded_gguf, resolve_local_folder
from genops_assets.lib.hashing import sha256_dir, sha256_file
from resources.paths import GenopsHome

# Bumped when base_model's logic changes: it is then stale and converted / resolved again.
BASE_MODEL_CODE_VERSION = "base-model-1"


class BaseModelConfig(dg.Config):
    model_path: str | None = Field(
        default=None,
        description="A local Hugging Face causal-LM folder (config.json + safetensors) to tune "
        "instead of the embedded SmolLM2-135M-Instruct. Nothing is downloaded.",
    )


def base_model_version(model_path: str | None) -> str:
    """Data version of base_model: the digest of its source (the configured folder, or the
    embedded GGUF the safetensors folder is converted from, deterministically). Sensors compute
    it the same way to tell whether a retrain must materialize the base model again."""
    if model_path:
        return sha256_dir(Path(model_path).expanduser().resolve())[:16]
    return sha256_file(find_embedded_gguf())[:16]


@dg.asset(group_name="models", kinds={"huggingface", "safetensors"}, code_version=BASE_MODEL_CODE_VERSION)
def base_model(context: dg.AssetExecutionContext, config: BaseModelConfig, home: GenopsHome) -> dg.Output[dict]:
    """A safetensors Hugging Face model folder to tune and serve. The embedded GGUF is converted
    once into the model cache, keyed by the GGUF's sha256; later materializations reuse it.
    Cost: ~25 s the first time, ~2 s after."""
    if config.model_path:
        info = resolve_local_folder(Path(config.model_path).expanduser().resolve())
    else:
        info = convert_gguf(find_embedded_gguf(), home.models_dir / "base", log=context.log.info)
    return dg.Output(
        info.as_dict(),
        metadata={
            "path": dg.MetadataValue.path(info.path),
            "name": info.name,
            "parameters": info.parameters,
            "dtype": info.dtype,
            "size_mb": round(info.size_bytes / 2**20, 1),
            "source": info.source,
            "source_sha256": info.source_digest,
            "folder_sha256": info.folder_digest,
            "reused_cache": info.reused,
        },
        # What it was made from: the same source gives the same folder (see base_model_version).
        data_version=dg.DataVersion(info.source_digest[:16]),
    )
