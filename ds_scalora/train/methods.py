"""The methods a run can train, one entry per ``method.name``: how the entry wraps the model, attaches
its controller to the engine, shapes the learning rate, and what it logs, finishes and summarises.

``ds_scalora.train.loop`` runs any entry the same way, top to bottom; adding a method to
``launch/train.py`` means adding one entry here (and its options to the run config). The method itself
(layers, config class, controllers) lives in ``ds_scalora.methods`` and ``ds_scalora.zero``.
"""

from __future__ import annotations

import os

import torch


class Method:
    """Full fine-tuning: every parameter trains (with ``method.target_modules`` a list: only the weights
    of the modules it names, matched as PEFT matches its adapters, so a full-rank update of exactly what
    a LoRA run would adapt); nothing is attached, nothing extra is logged."""

    name = "full"
    log_prefix = None  # the history keys the method logs itself (``tensorboard``), not the loop

    def wrap(self, model, cfg):
        targets = cfg.method.target_modules
        if targets != "all-linear":
            train_only(model, targets)
        return model

    def config(self, cfg):
        """The method's library config built from the run config (ValueError naming the field if invalid), or None."""
        return None

    def attach(self, engine, model, cfg):
        """The controller the run saves and loads with its checkpoints, or None."""
        return None

    def lr_factor(self, cfg):
        """A multiplier on the schedule's factor, ``step -> float``, or None."""
        return None

    def record(self, controller) -> dict:
        """The method's entries in a step's history record (after the optimizer step)."""
        return {}

    def tensorboard(self, writer, controller, record: dict, step: int, first: bool) -> None:
        """The method's own TensorBoard entries for the step just taken (``first``: the run's first)."""

    def log_own_scalars(self, writer, record: dict, step: int) -> None:
        """The record's ``log_prefix`` entries, which the loop leaves to the method."""
        for key, value in record.items():
            if self.log_prefix and key.startswith(self.log_prefix):
                writer.add_scalar(key, value, step)

    def finish(self, cfg, controller, rank: int) -> None:
        """After the last step, on every rank (collective)."""

    def summary(self, controller, history: list) -> dict:
        """The method's keys in ``summary.json``."""
        return {}


class LoRA(Method):
    """PEFT's LoRA (``method.use_rslora: true`` for α/√r)."""

    name = "lora"
    rslora = False

    def wrap(self, model, cfg):
        from peft import LoraConfig, get_peft_model

        m = cfg.method
        lora = LoraConfig(r=m.r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=m.target_modules,
                          use_rslora=m.use_rslora or self.rslora, task_type="CAUSAL_LM")  # fmt: skip
        return get_peft_model(model, lora)



class RsLoRA(LoRA):
    """LoRA with α/√r scaling."""

    name = "rslora"
    rslora = True


def _last(history: list, key: str):
    values = [h[key] for h in history if key in h]
    return values[-1] if values else None


class ScaLoRA(LoRA):
    """LoRA plus the optimal column scaling and merge every ``interval`` steps (ds_scalora.zero.attach)."""

    name = "scalora"
    log_prefix = "scalora/"

    def config(self, cfg):
        from dataclasses import fields

        from ..methods.scalora_config import ScaLoRAConfig

        o = cfg.method.scalora
        return ScaLoRAConfig(**{f.name: getattr(o, f.name) for f in fields(o)}, seed=cfg.train.seed)

    def attach(self, engine, model, cfg):
        from ..zero import attach

        return attach(engine, model, self.config(cfg))

    def record(self, controller) -> dict:
        report = controller.last_report
        if report is None:
            return {}
        ab = torch.cat(report.alpha_beta) if report.alpha_beta else torch.ones(1)
        return {"scalora/scalar_fraction": report.scalar_fraction, "scalora/alpha_beta_mean": float(ab.mean()),
                "scalora/alpha_beta_min": float(ab.min()), "scalora/alpha_beta_max": float(ab.max()),
                "scalora/merged_norm": report.merged_norm,
                **({"scalora/accumulated_rank_mean": report.accumulated_rank_mean,
                    "scalora/accumulated_rank_max": max(report.accumulated_rank),
                    "scalora/energy_outside_top_r_mean": report.energy_outside_mean} if report.accumulated_rank else {})}  # fmt: skip

    def tensorboard(self, writer, controller, record: dict, step: int, first: bool) -> None:
        report = controller.last_report
        if report is None:  # only at a refresh
            return
        self.log_own_scalars(writer, record, step)
        if report.alpha_beta:
            writer.add_histogram("scalora/alpha_beta", torch.cat(report.alpha_beta), step)
        if report.accumulated_rank:
            writer.add_histogram("scalora/accumulated_rank_per_layer", torch.tensor(report.accumulated_rank), step)

    def summary(self, controller, history: list) -> dict:
        return {"scalora_totals": dict(controller.totals),
                "scalora_accumulated_rank": _last(history, "scalora/accumulated_rank_mean"),
                # share of the accumulated update's energy outside its top r directions (sketch estimate, mean over layers)
                "scalora_energy_outside_top_r": _last(history, "scalora/energy_outside_top_r_mean")}


class ReLoRA(ScaLoRA):
    """The ScaLoRA refresh with α = β = 0 (merge everything), a fresh lora_A, and the learning rate
    re-warmed after each restart."""

    name = "relora"

    def config(self, cfg):
        from ..methods.scalora_config import ScaLoRAConfig

        o = cfg.method.relora
        return ScaLoRAConfig(interval=o.interval, warmup_steps=o.warmup_steps, restart=True,
                             precision=cfg.method.scalora.precision, rank_sketch=cfg.method.scalora.rank_sketch,
                             rank_sketch_every=cfg.method.scalora.rank_sketch_every,
                             seed=cfg.train.seed)  # fmt: skip

    def lr_factor(self, cfg):
        o = cfg.method.relora
        if not o.rewarm_steps:
            return None

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return 1.0
            since = (step - o.warmup_steps) % o.interval  # steps since the last restart
            return min(1.0, (since + 1) / o.rewarm_steps)

        return factor


class ElaLoRA(Method):
    """Ranks that prune and expand during training (ds_scalora.zero.attach_elalora); the final model is a
    stock PEFT LoRA adapter with its rank pattern (export/adapter_export.py)."""

    name = "elalora"
    log_prefix = "elalora/"

    def config(self, cfg):
        from .config import elalora_config

        return elalora_config(cfg)

    def wrap(self, model, cfg):
        from ..methods.elalora import elastic_lora_model

        m, e = cfg.method, self.config(cfg)
        return elastic_lora_model(model, m.target_modules, init_rank=e.init_rank, max_rank=e.max_rank, alpha=m.lora_alpha,
                                  dropout=m.lora_dropout, total_steps=e.total_steps)  # fmt: skip

    def attach(self, engine, model, cfg):
        from ..zero import attach_elalora

        return attach_elalora(engine, model, self.config(cfg))

    def record(self, controller) -> dict:
        report = controller.last_report
        if report is None:
            return {}
        out = {"elalora/total_rank": sum(report.ranks)}
        if report.orth_penalty is not None:
            out["elalora/orth_penalty"] = report.orth_penalty
        if report.moves:
            out["elalora/moves"] = report.moves
        return out

    def tensorboard(self, writer, controller, record: dict, step: int, first: bool) -> None:
        from .rank_plots import short_name

        report = controller.last_report
        if report is None or not (report.moves or first):  # at every round
            return
        self.log_own_scalars(writer, record, step)
        for layer, r in zip(controller.layers, report.ranks):
            writer.add_scalar(f"elalora_rank/{short_name(layer.name)}", r, step)
        writer.add_histogram("elalora/rank_per_matrix", torch.tensor(report.ranks), step)

    def finish(self, cfg, controller, rank: int) -> None:
        """The rank heatmap (the adapter with its final rank_pattern is the run's final model)."""
        from .rank_plots import write_rank_heatmap

        out = cfg.train.output_dir
        if rank == 0:
            write_rank_heatmap(controller.core.rounds, [layer.name for layer in controller.layers],
                               os.path.join(out, "rank_heatmap.png"), controller.config.max_rank)  # fmt: skip

    def summary(self, controller, history: list) -> dict:
        from .rank_plots import short_name

        pattern = controller.rank_pattern()
        return {"elalora_rank_pattern": {short_name(k): v for k, v in pattern.items()},
                "elalora_budget": controller.core.budget, "elalora_total_rank": sum(pattern.values()),
                "elalora_totals": dict(controller.totals),
                "elalora_layers": [short_name(layer.name) for layer in controller.layers],
                "elalora_rounds": controller.core.rounds}  # fmt: skip


METHODS = {m.name: m for m in (Method(), LoRA(), RsLoRA(), ScaLoRA(), ReLoRA(), ElaLoRA())}


def method_of(cfg) -> Method:
    return METHODS[cfg.method.name]


def train_only(model, targets: list) -> None:
    """Freeze every parameter but those of the modules ``targets`` names (PEFT's own matching rule:
    a full name or a ``.``-suffix of one); a ValueError naming the list when it matches nothing."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    rule = LoraConfig(target_modules=list(targets))
    chosen = [name for name, module in model.named_modules() if name and check_target_module_exists(rule, name)
              and any(True for _ in module.parameters(recurse=False))]
    if not chosen:
        examples = list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in model.named_parameters()))[:3]  # modules with weights
        raise ValueError(f"method.target_modules {list(targets)} matches no module of the model (names such as "
                         f"{examples}): fix the names, or use 'all-linear' to fine-tune every parameter")
    keep = {id(p) for name in chosen for p in model.get_submodule(name).parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
