"""Export a trained rank policy into a Hugging Face causal LM whose attention is dynamic-rank, and load it back.

An exported directory holds

* ``policy.safetensors``: for a learned policy, its actor as a plain torch module (:class:`RankPolicyNetwork`: the
  token transformer the agent's features extractor uses, its policy MLP and action head; no value head, no SB3);
  rule-based policies (``drrl_gym.policies``: uniform, static allocation, NER rule, ALRT controller...) need no
  weights, only their kind and parameters in ``drrl_config.json``;
* ``basis.safetensors``: the calibrated rank basis, (num_layers, num_kv_heads, d, d) (absent for ``basis="exact"``);
* ``drrl_config.json``: format and version, the controller's settings (rank choices, granularity, segment_len,
  seq_len for the position feature, epsilon of the mask, basis mode), the policy's kind and architecture or
  parameters, the backbone spec,
  the environment config it was trained with, and a SHA-256 of every file;
* optionally ``backbone/``: the frozen model itself (``save_pretrained``), so the directory loads offline; by default
  the backbone is referenced by name (``load_backbone`` spec, e.g. ``"smollm2-135m"``).

:func:`load_dynamic_rank_model` returns the HF model itself (``model(...)``, ``model.generate(...)``), with a
:class:`~drrl_gym.runtime.DynamicRankRuntime` at ``model.drrl``; ``drrl_gym.runtime`` says what its forward does.
A modified file or another format version is refused with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from drrl_gym.backbone import AttentionGeometry, Backbone, load_backbone, resolve_device
from drrl_gym.config import EnvConfig
from drrl_gym.policies import (
    ACTIVATIONS,
    NetworkPolicy,
    PolicyArch,
    RankPolicy,
    RankPolicyNetwork,
    policy_from_config,
)
from drrl_gym.resources import shared_basis
from drrl_gym.runtime import ControllerSpec, DynamicRankRuntime, build_dynamic_rank_model

# The runtime's names stay importable from here, where exports have always found them.
__all__ = ["ACTIVATIONS", "PolicyArch", "RankPolicyNetwork", "ControllerSpec", "DynamicRankRuntime",
           "ExportedPolicy", "build_dynamic_rank_model", "export_dynamic_rank_model", "export_env_policy",
           "load_dynamic_rank_model", "load_exported_policy", "read_export_config"]

FORMAT = "drrl-gym/dynamic-rank-model"
# 3: the mask bounds the distance from full rank (2 bounded the step from the previous rank) and the env config
#    names the reward weights fidelity_weight, cost_weight, perturbation_weight; 2: the policy block names its kind
#    (rule-based policies need no weights); 1 held networks only.
FORMAT_VERSION = 3
CONFIG_FILE, POLICY_FILE, BASIS_FILE, BACKBONE_DIR = "drrl_config.json", "policy.safetensors", "basis.safetensors", "backbone"


def export_dynamic_rank_model(path: str | Path, backbone: Backbone, policy: RankPolicy | RankPolicyNetwork,
                              basis: torch.Tensor | None, env_config: EnvConfig, save_backbone: bool = False,
                              overwrite: bool = False) -> Path:
    """Write the export directory described in the module docstring; returns its path.

    ``policy``: a learned network (its weights go to ``policy.safetensors``) or any rule-based
    :class:`~drrl_gym.policies.RankPolicy` (its ``kind`` and ``config()`` go to ``drrl_config.json``).
    ``backbone`` gives the model spec (its ``name``) and, with ``save_backbone``, the weights to save. The directory
    is written next to ``path`` and renamed into place, so a crash never leaves a half-written export behind.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists. Fix: choose another path or pass overwrite=True.")
    spec = ControllerSpec.from_env_config(env_config)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    network = policy if isinstance(policy, RankPolicyNetwork) else getattr(policy, "network", None)
    if network is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, tmp / POLICY_FILE)
        policy_block = {"kind": NetworkPolicy.kind, "arch": asdict(network.arch)}
    else:
        policy_block = {"kind": policy.kind, "params": policy.config()}
    if basis is not None:
        save_file({"basis": basis.detach().float().cpu().contiguous()}, tmp / BASIS_FILE)
    if save_backbone:
        backbone.model.save_pretrained(tmp / BACKBONE_DIR)
        backbone.tokenizer.save_pretrained(tmp / BACKBONE_DIR)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "controller": asdict(spec),
        "policy": policy_block,
        "backbone": {"spec": BACKBONE_DIR if save_backbone else backbone.name, "saved": save_backbone,
                     "geometry": asdict(backbone.geometry)},
        "env_config": asdict(env_config),
        "files": {str(f.relative_to(tmp)): _sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()},
    }
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if path.exists():
        shutil.rmtree(path)
    tmp.replace(path)
    return path


def export_env_policy(path: str | Path, env: Any, policy: RankPolicy | RankPolicyNetwork, save_backbone: bool = False,
                      overwrite: bool = False) -> Path:
    """:func:`export_dynamic_rank_model` of a policy trained on ``env`` (a ``DRRLAttentionEnv`` or
    ``DRRLAttentionVecEnv``): its backbone, its config and its calibrated basis (the one the env uses)."""
    basis = shared_basis(env.backbone, env.corpus) if env.config.basis == "calibrated" else None
    return export_dynamic_rank_model(path, env.backbone, policy, basis, env.config, save_backbone, overwrite)


def read_export_config(path: str | Path) -> dict[str, Any]:
    """``drrl_config.json`` of an export directory, after checking its format, version and every file's SHA-256."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a dynamic-rank export: no {CONFIG_FILE}. Fix: pass a directory written "
                                "by export_dynamic_rank_model (e.g. RUN_DIR/export).")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}): the export is damaged. Fix: re-export, or restore "
                         "the original file.") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_file}: format {found!r} is not {FORMAT!r}. Fix: pass a dynamic-rank export.")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_file}: format version {config.get('format_version')!r}, but this drrl-gym reads version "
                         f"{FORMAT_VERSION}. Fix: re-export the policy with this version of drrl-gym.")
    for name, digest in config["files"].items():
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in {CONFIG_FILE} but missing. Fix: copy the whole export directory.")
        if _sha256(file) != digest:
            raise ValueError(f"checksum mismatch for {file}: the file was modified or corrupted after export. Fix: "
                             "re-export, or restore the original file.")
    return config


@dataclass
class ExportedPolicy:
    """What an export directory holds besides the backbone: the policy, its controller spec and basis, its provenance."""

    policy: RankPolicy
    spec: ControllerSpec
    basis: torch.Tensor | None
    geometry: AttentionGeometry  # of the model it was made for
    env_config: EnvConfig
    backbone_spec: str  # what load_backbone loads it from


def load_exported_policy(path: str | Path) -> ExportedPolicy:
    """The policy of an export directory (checked like :func:`load_dynamic_rank_model`) without loading its model:
    e.g. to run several exported policies through one model (``benchmarks/pareto.py``)."""
    path = Path(path)
    config = read_export_config(path)
    spec = ControllerSpec(**config["controller"])
    source = config["backbone"]
    geometry = AttentionGeometry(**source["geometry"])
    controller, block = spec.controller(geometry), config["policy"]
    if block["kind"] == NetworkPolicy.kind:
        network = RankPolicyNetwork(PolicyArch(**block["arch"]))
        network.load_state_dict(load_file(path / POLICY_FILE))
        policy: RankPolicy = NetworkPolicy(controller, network)
    else:
        policy = policy_from_config(controller, block["kind"], block["params"])
    basis = load_file(path / BASIS_FILE)["basis"] if (path / BASIS_FILE).is_file() else None
    backbone_spec = str(path / BACKBONE_DIR) if source["saved"] else source["spec"]
    return ExportedPolicy(policy, spec, basis, geometry, _env_config(config["env_config"]), backbone_spec)


def load_dynamic_rank_model(path: str | Path, device: str | torch.device = "auto",
                            dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load an export directory as a dynamic-rank HF model (runtime at ``model.drrl``, tokenizer at
    ``model.drrl.tokenizer``). ``dtype=None``: bf16 on CUDA, fp32 on CPU (``load_backbone``'s default)."""
    exported = load_exported_policy(path)
    backbone = load_backbone(exported.backbone_spec, resolve_device(device), dtype)
    if backbone.geometry != exported.geometry:
        raise ValueError(f"backbone {exported.backbone_spec!r} has geometry {backbone.geometry}, but the export was made "
                         f"for {exported.geometry}. Fix: load the model the policy was trained on.")
    return build_dynamic_rank_model(backbone, exported.policy, exported.basis, exported.spec, exported.env_config)


def _env_config(values: dict[str, Any]) -> EnvConfig:
    known = {f.name for f in fields(EnvConfig)}
    values = {k: v for k, v in values.items() if k in known}
    # The device it was trained on is provenance, not a requirement: a GPU-trained export loads on CPU.
    return EnvConfig(**{**values, "rank_choices": tuple(values["rank_choices"]), "device": "auto"})


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
