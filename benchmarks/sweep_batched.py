"""(d) Sweep throughput: a 3 × 3 η × P grid of the ``frozen`` protocol, sequential vs batched.

Nine configurations (η ∈ {0.0075, 0.015, 0.03} × P ∈ {0.25, 0.5, 1.0}, mode ``pt``, seed 0) on one
frozen base (``mixtral-tiny``, the quickstart's model, pretrained briefly by the protocol's own
``pretrained_base``) and the quickstart's data sizes (the synthetic phase-structured conversations):

* **sequential**: for each configuration, wrap the base with a single controller, run the warm-up
  stream (one tick per conversation, as ``run_cell`` does for ``frozen``), evaluate the held-out
  conversations, unwrap — nine times;
* **batched**: wrap the base *once* with a stacked controller (``PTController(L, E, K, [cfg × 9])``),
  feed every batch repeated nine times along the batch axis (group c = configuration c), one tick
  per forward with each group's own loss, and split the held-out outputs per group.

Both arms then compute the same per-cell held-out metrics (loss, per-layer separation with its
permutation null, NMI, load balance — the code of ``eval.protocols.evaluate_heldout``). Times are
split into the *model phase* (warm-up + held-out forwards) and the *metrics phase* (the same work in
both arms), and reported as cells per minute. The results must agree: per cell, held-out loss,
every held-out routing decision, and the controller fields after the warm-up; for two cells the
batched result is also checked against the real ``eval.protocols.run_cell``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import chronovisor
from benchmarks import Context, row
from chronovisor.controllers import PTConfig
from chronovisor.wrappers import describe

NAME = "sweep_batched"
MODEL = "mixtral-tiny"
ETAS = (0.0075, 0.015, 0.03)
PRESSURES = (0.25, 0.5, 1.0)
TARGET = 3.0
FIELDS = ("pressure", "temperature", "T_bar_global", "T_bar_local", "usage")


def _specs(quick: bool):
    from chronovisor.eval import protocols as P

    generator = dict(min_turn_length=20, max_turn_length=40, min_length=160, max_length=260)   # quickstart
    data = P.DataSpec(num_train=16, num_heldout=4 if quick else 8, num_warmup=4 if quick else 10, generator=generator)
    train = P.TrainSpec(pretrain_steps=5 if quick else 20, lr=3e-3)
    evaluation = P.EvalSpec(null_permutations=20 if quick else 100)
    return data, train, evaluation


def _repeat(tensors: dict[str, torch.Tensor], groups: int) -> dict[str, torch.Tensor]:
    return tensors if groups == 1 else {k: v.repeat(groups, *([1] * (v.dim() - 1))) for k, v in tensors.items()}


def _group_losses(logits: torch.Tensor, targets: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean next-token CE per group ``[groups]`` (padding masked), as ``protocols.mean_loss`` per group."""
    from chronovisor.eval import data as data_lib

    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets,
                                               ignore_index=data_lib.IGNORE_INDEX, reduction="none")
    scored = (targets != data_lib.IGNORE_INDEX).float()
    return (losses * scored).view(groups, -1).sum(1) / scored.view(groups, -1).sum(1).clamp_min(1)


def warm_up(cm, warmup, batch_size: int, device: torch.device, groups: int) -> None:
    """The ``frozen`` protocol's warm-up stream: one forward and one tick per batch, no gradients."""
    from chronovisor.eval import protocols as P

    schedule = [list(range(i, min(i + batch_size, len(warmup)))) for i in range(0, len(warmup), batch_size)]
    cm.eval()
    with torch.no_grad():
        for indices in schedule:
            inputs = P.model_inputs(cm.base_model, warmup.select(indices), device)
            if groups == 1:
                loss = P.mean_loss(cm, inputs)
            else:
                logits = cm(**_repeat(inputs.kwargs, groups), use_cache=False).logits
                loss = _group_losses(logits, _repeat({"t": inputs.targets}, groups)["t"], groups)
            cm.controller.step(loss=loss)


def heldout_pass(cm, heldout, spec, device: torch.device, groups: int) -> list[dict[str, Any]]:
    """The forward half of ``protocols.evaluate_heldout``, for ``groups`` stacked configurations.

    Returns per group the raw material of the record: loss sums, per-conversation losses, per-layer
    expert ids of the real tokens, their turn and conversation ids.
    """
    from chronovisor.eval import data as data_lib
    from chronovisor.eval import protocols as P

    cm.eval()
    raws = [{"total": 0.0, "count": 0, "per_conversation": [], "layer_ids": {}, "turns": [], "conversations": []}
            for _ in range(groups)]
    with torch.no_grad():
        for start in range(0, len(heldout), spec.batch_size):
            indices = list(range(start, min(start + spec.batch_size, len(heldout))))
            inputs = P.model_inputs(cm.base_model, heldout.select(indices), device)
            with cm.record_routing() as record:
                output = cm(**_repeat(inputs.kwargs, groups), use_cache=False)
            targets = inputs.targets
            B, S = targets.shape
            losses = torch.nn.functional.cross_entropy(
                output.logits.float().transpose(1, 2), _repeat({"t": targets}, groups)["t"],
                ignore_index=data_lib.IGNORE_INDEX, reduction="none").view(groups, B, S)
            scored = targets != data_lib.IGNORE_INDEX
            turns = inputs.turn_ids.reshape(-1).cpu().numpy()
            real = turns >= 0
            positions = inputs.turn_ids.numel()
            rows = np.repeat(np.asarray(indices), S)
            for g, raw in enumerate(raws):
                raw["total"] += float(losses[g][scored].sum())
                raw["count"] += int(scored.sum())
                raw["per_conversation"] += (losses[g].sum(1) / scored.sum(1).clamp_min(1)).tolist()
                raw["turns"].append(turns[real])
                raw["conversations"].append(rows[real])
            for name, stack, index in zip(record.layer_names, record.layer_stacks, record.expert_index, strict=True):
                if stack != "decoder" or index.shape[0] != positions * groups:
                    continue
                per_group = index.view(groups, positions, -1)
                for g, raw in enumerate(raws):
                    raw["layer_ids"].setdefault(name, []).append(per_group[g].numpy()[real])
    return raws


def cell_record(raw: dict[str, Any], num_experts: int, spec, seed: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The metrics half of ``protocols.evaluate_heldout`` (same code, same record keys)."""
    from chronovisor.eval import metrics

    turns = np.concatenate(raw["turns"])
    conversations = np.concatenate(raw["conversations"])
    routing = {name: np.concatenate(chunks).astype(np.int16) for name, chunks in raw["layer_ids"].items()}
    layers = []
    for name, experts in routing.items():
        excess = metrics.excess_separation(experts, turns, num_experts, conversations,
                                           n_permutations=spec.null_permutations, seed=seed)
        balance = metrics.load_balance(experts, num_experts)
        layers.append({"layer": name, "separation": excess.separation, "null_mean": excess.null_mean,
                       "excess_separation": excess.excess, "nmi": metrics.normalized_mutual_information(
                           experts, turns, num_experts), "max_vio": balance.max_vio, "load_cv": balance.cv})
    return {"loss": raw["total"] / raw["count"], "tokens": raw["count"], "layers": layers}, routing


def _fields(controller, group: int | None) -> dict[str, torch.Tensor]:
    return {name: (getattr(controller, name) if group is None else getattr(controller, name)[group]).clone()
            for name in FIELDS}


def run(ctx: Context) -> dict[str, Any]:
    from chronovisor.eval import protocols as P

    data, train, evaluation = _specs(ctx.quick)
    seed = ctx.seed
    configs = [PTConfig(eta=eta, pressure_scale=p, mode="pt", seed=seed) for eta in ETAS for p in PRESSURES]
    cells = [P.CellSpec("frozen", MODEL, seed, config, data, train, evaluation) for config in configs]
    groups = len(configs)
    device = ctx.device
    rounds = 1 if ctx.quick else 3

    with tempfile.TemporaryDirectory(prefix="chronovisor-bench-") as work:
        work_dir = Path(work)
        conversations = P.load_conversations(data, seed, MODEL, "frozen")
        base = P.pretrained_base(cells[0], conversations, work_dir, device)   # shared by every cell, untimed
        base.requires_grad_(False)
        num_experts = describe(base).num_experts

        def sequential():
            raws, fields = [], []
            for config in configs:
                cm = chronovisor.wrap(base, config, tick="manual")
                warm_up(cm, conversations.warmup, train.batch_size, device, 1)
                fields.append(_fields(cm.controller, None))
                raws += heldout_pass(cm, conversations.heldout, evaluation, device, 1)
                cm.unwrap()
            return raws, fields

        def batched():
            cm = chronovisor.wrap(base, configs, tick="manual")
            warm_up(cm, conversations.warmup, train.batch_size, device, groups)
            fields = [_fields(cm.controller, g) for g in range(groups)]
            raws = heldout_pass(cm, conversations.heldout, evaluation, device, groups)
            cm.unwrap()
            return raws, fields

        def metrics_phase(raws):
            return [cell_record(raw, num_experts, evaluation, seed) for raw in raws]

        timing: dict[str, dict[str, list[float]]] = {arm: {"model": [], "metrics": []} for arm in ("sequential", "batched")}
        outputs: dict[str, Any] = {}
        batched()                                                           # warm-up (allocator, caches)
        for r in range(rounds):
            for arm, fn in ((("sequential", sequential), ("batched", batched)) if r % 2 == 0
                            else (("batched", batched), ("sequential", sequential))):
                start = time.perf_counter()
                raws, fields = fn()
                middle = time.perf_counter()
                records = metrics_phase(raws)
                end = time.perf_counter()
                timing[arm]["model"].append(middle - start)
                timing[arm]["metrics"].append(end - middle)
                outputs[arm] = (records, fields)

        # ---- equality: batched group c vs sequential cell c
        (seq_records, seq_fields), (bat_records, bat_fields) = outputs["sequential"], outputs["batched"]
        loss_diff, routing_agree, field_diff, metric_diff = [], [], [], []
        for c in range(groups):
            (seq_record, seq_routing), (bat_record, bat_routing) = seq_records[c], bat_records[c]
            loss_diff.append(abs(seq_record["loss"] - bat_record["loss"]))
            same = [float(np.mean(seq_routing[name] == bat_routing[name])) for name in seq_routing]
            routing_agree.append(min(same))
            field_diff.append(max(float((seq_fields[c][k] - bat_fields[c][k]).abs().max()) for k in FIELDS))
            metric_diff.append(max(abs(a["excess_separation"] - b["excess_separation"])
                                   for a, b in zip(seq_record["layers"], bat_record["layers"], strict=True)))

        # ---- fidelity: batched group vs the real protocol (run_cell) for the first and last cell
        fidelity = []
        for c in (0, groups - 1):
            start = time.perf_counter()
            result = P.run_cell(cells[c], work_dir, device)
            elapsed = time.perf_counter() - start
            bat_record, bat_routing = bat_records[c]
            fidelity.append({
                "cell": cells[c].cell_id, "run_cell_s": elapsed,
                "loss_abs_diff": abs(result.record["heldout"]["loss"] - bat_record["loss"]),
                "routing_agreement": min(float(np.mean(result.routing[name] == bat_routing[name]))
                                         for name in bat_routing),
            })

    med = {arm: {phase: float(np.median(v)) for phase, v in phases.items()} for arm, phases in timing.items()}
    model_speedup = med["sequential"]["model"] / med["batched"]["model"]
    total = {arm: med[arm]["model"] + med[arm]["metrics"] for arm in med}
    total_speedup = total["sequential"] / total["batched"]
    cells_per_min = {arm: 60.0 * groups / total[arm] for arm in total}
    equal = (max(loss_diff) <= 1e-5 and min(routing_agree) == 1.0 and max(field_diff) <= 1e-5
             and all(f["loss_abs_diff"] <= 1e-5 and f["routing_agreement"] == 1.0 for f in fidelity))
    label = f"{groups} cells ({len(ETAS)}η×{len(PRESSURES)}P), {MODEL}, frozen, {device.type}"
    rows = [
        row(NAME, f"model phase speedup, sequential / batched ({label})", model_speedup, "×", f"≥ {TARGET:g}",
            model_speedup >= TARGET, f"sequential {med['sequential']['model']:.2f} s, batched {med['batched']['model']:.2f} s"),
        row(NAME, "end-to-end speedup incl. metrics", total_speedup, "×",
            note=f"metrics {med['batched']['metrics']:.2f} s in both arms (not batched)"),
        row(NAME, "cells per minute: sequential → batched", f"{cells_per_min['sequential']:.1f} → "
            f"{cells_per_min['batched']:.1f}", note="model + metrics phases"),
        row(NAME, "batched == sequential (loss, routing, fields)", "equal" if equal else "DIFFERENT", met=equal,
            note=f"max |Δloss| {max(loss_diff):.2g}, min routing agreement {min(routing_agree):.6f}, "
                 f"max |Δfield| {max(field_diff):.2g}; vs run_cell: |Δloss| "
                 f"{max(f['loss_abs_diff'] for f in fidelity):.2g}, routing {min(f['routing_agreement'] for f in fidelity):.6f}"),
    ]
    return {
        "model": MODEL, "protocol": "frozen", "grid": {"eta": ETAS, "pressure_scale": PRESSURES}, "rounds": rounds,
        "data": {"num_warmup": data.num_warmup, "num_heldout": data.num_heldout, **data.generator},
        "pretrain_steps": train.pretrain_steps, "null_permutations": evaluation.null_permutations,
        "seconds": timing, "median_seconds": med, "model_phase_speedup": model_speedup,
        "end_to_end_speedup": total_speedup, "cells_per_minute": cells_per_min,
        "equality": {"loss_abs_diff": loss_diff, "routing_agreement": routing_agree, "field_max_abs_diff": field_diff,
                     "excess_separation_abs_diff": metric_diff, "vs_run_cell": fidelity, "equal": equal},
        "rows": rows,
    }
