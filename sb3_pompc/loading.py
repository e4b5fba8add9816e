"""The configuration of a saved model: files written before :class:`~sb3_pompc.config.POMPCConfig` existed, and
settings changed when a model is loaded (``POMPC.load(path, **settings)``, rl-zoo3's ``-i``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sb3_pompc.config import POMPCConfig, parse_kl_coef, validate

__all__ = ["FIXED_AFTER_BUILD", "changed_config", "legacy_config", "LEGACY_ATTRIBUTES", "update_loaded_attributes"]

#: SB3 attributes of the algorithm that mirror a setting
SB3_SETTINGS = ("learning_rate", "batch_size", "tau", "gamma", "train_freq", "gradient_steps")


#: settings that define a saved model's networks, replay windows or compiled functions: ``load`` cannot change them
FIXED_AFTER_BUILD = (
    "preset", "model_size", "latent_dim", "mlp_dim", "enc_dim", "num_enc_layers", "simnorm_layout", "num_q", "critic",
    "policy_squash", "log_std_min", "log_std_max", "critic_init", "prior", "kl_value", "horizon", "buffer_size",
    "episodic", "compile",
)


def changed_config(config: POMPCConfig, changes: dict[str, Any]) -> POMPCConfig:
    """A loaded model's config with ``changes`` (``POMPC.load(path, **changes)``, rl-zoo3's ``-i``): the settings of
    :data:`FIXED_AFTER_BUILD`, and a switch between a fixed and a learned λ, are refused with an error that names
    them; the others take effect (planner, losses, optimiser steps). None leaves a setting as it is, and so does
    "auto" for the settings resolved from the environment at construction.

    :param config: the saved model's resolved config
    :param changes: setting → new value
    """
    auto = {f.name for f in dataclasses.fields(POMPCConfig) if f.default == "auto"}  # resolved once, at construction
    changes = {k: v for k, v in changes.items()
               if v is not None and not (k in auto and v == "auto") and v != getattr(config, k)}
    fixed = sorted(k for k in changes if k in FIXED_AFTER_BUILD)
    if "kl_coef" in changes and parse_kl_coef(changes["kl_coef"])[1] != parse_kl_coef(config.kl_coef)[1]:  # type: ignore[arg-type]
        fixed.append("kl_coef (fixed ↔ learned)")
    if fixed:
        raise ValueError(
            f"a loaded model cannot change {fixed}: they define its networks, replay windows or compiled functions "
            f"(saved: {', '.join(f'{k.split()[0]}={getattr(config, k.split()[0])!r}' for k in fixed)}). Train a new "
            "model for other values, or leave them out"
        )
    new = dataclasses.replace(config, **changes)
    if "num_samples" in changes and config.reanalyze_num_samples == config.num_samples:
        new = dataclasses.replace(new, reanalyze_num_samples=new.num_samples)
    validate(new)
    return new


def legacy_config(attrs: dict[str, Any]) -> POMPCConfig:
    """The config of a model saved before :class:`POMPCConfig` existed, when each setting was an attribute of the
    algorithm (``cfg`` held the preset's settings, the policy kwargs the model's and the planner's).

    :param attrs: the saved attributes
    """
    model, planner = attrs["policy_kwargs"]["model_kwargs"], attrs["policy_kwargs"]["planner_kwargs"]
    freq = attrs["train_freq"]
    return POMPCConfig(
        **{k: v for k, v in attrs["cfg"].items()},
        preset=attrs["preset"], kl_value=attrs["kl_value"], mask_unplanned=False, target_kl=attrs["target_kl"],
        kl_warmup=attrs["kl_warmup"], learning_rate=attrs["learning_rate"], buffer_size=attrs["buffer_size"],
        learning_starts=attrs["learning_starts"], pretrain_updates=attrs["pretrain_updates"],
        batch_size=attrs["batch_size"], tau=attrs["tau"], gamma=attrs["gamma"],
        train_freq=(freq.frequency, freq.unit.value), gradient_steps=attrs["gradient_steps"],
        horizon=attrs["horizon"], iterations=attrs["iterations"],
        **{k: planner[k] for k in ("num_samples", "num_elites", "num_pi_trajs", "temperature", "min_std", "max_std")},
        deterministic_action=planner.get("deterministic_action", "sample"),
        model_size=attrs["model_size"],
        **{k: model[k] for k in ("latent_dim", "mlp_dim", "enc_dim", "num_enc_layers")},
        simnorm_layout=model.get("simnorm_layout", "contiguous"),
        reanalyze_batch_size=attrs["reanalyze_batch_size"], reanalyze_horizon=attrs["reanalyze_horizon"],
        reanalyze_num_samples=attrs["reanalyze_num_samples"] or planner["num_samples"],
        expl_log_std_min=attrs["expl_log_std_bounds"][0], expl_log_std_max=attrs["expl_log_std_bounds"][1],
        episodic=attrs["episodic"], detect_termination=attrs["_episodic_auto"],
        entropy_coef=attrs["entropy_coef"], rho=attrs["rho"], **attrs["loss_coefs"],
        enc_lr_scale=attrs["enc_lr_scale"], grad_clip_norm=attrs["grad_clip_norm"],
        planner_dtype=attrs["policy_kwargs"].get("planner_dtype", "float32"), update_dtype=attrs["update_dtype"],
        compile=attrs["policy_kwargs"].get("compile", False),
    )


#: attributes of models saved before :class:`POMPCConfig` existed that the config now holds
LEGACY_ATTRIBUTES = (
    "cfg", "preset", "kl_coef", "kl_coef_init", "kl_coef_auto", "prior", "kl_value", "target_kl", "kl_warmup",
    "horizon", "entropy_coef", "rho", "loss_coefs", "enc_lr_scale", "grad_clip_norm", "reanalyze_interval",
    "reanalyze_batch_size", "reanalyze_horizon", "reanalyze_num_samples", "expl_log_std_bounds", "episode_length",
    "pretrain_updates", "_episodic_auto", "episodic", "iterations", "model_size", "update_dtype",
)


def update_loaded_attributes(attrs: dict[str, Any]) -> None:
    """Bring the attributes of a model being loaded up to date, in place, before its networks are built:

    - a file saved before :class:`POMPCConfig` existed gets its config from the old attributes (:func:`legacy_config`),
      which are then dropped; flags added since get the values the file implies;
    - settings given to ``load`` (stored under ``_load_settings``) go through :func:`changed_config`, then into the
      SB3 attributes and the policy's planner settings, so that they take effect.

    :param attrs: the algorithm's ``__dict__`` (an algorithm built without a saved file is left as it is)
    """
    attrs.setdefault("_has_plans", attrs.get("_pretrained", False))
    if "cfg" in attrs:
        attrs["config"] = legacy_config(attrs)
        for name in LEGACY_ATTRIBUTES:
            attrs.pop(name, None)
    settings = attrs.pop("_load_settings", None)
    if settings:
        config = attrs["config"] = changed_config(attrs["config"], settings)
        attrs.update({name: getattr(config, name) for name in SB3_SETTINGS})
        attrs["policy_kwargs"].update(planner_kwargs=config.planner_kwargs(), planner_dtype=config.planner_dtype)
