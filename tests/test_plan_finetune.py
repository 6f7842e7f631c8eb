"""`stade plan --finetune`: the fine-tuning terms against formulas written out by hand for the tiny Llama (2 blocks,
hidden 64, MLP 128, 4 heads of 16, 2 key-value heads, vocabulary 260, untied head), and the activations against
what autograd really keeps for the backward pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stade_cli.planning import memory as plan_memory
from stade_cli.planning.finetune import FinetunePlan
from stade_cli.planning.plan import PlanConfig, make_plan

from helpers import invoke

CPU = torch.device("cpu")
PARAMS = 2 * 260 * 64 + 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64) + 64  # embeddings, head, blocks, norm
PRUNED = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # every block's linear weights
ADAPTERS = 2 * 4 * (2 * (64 + 64) + 2 * (32 + 64) + 3 * (128 + 64))  # rank 4: A (4 x in) and B (out x 4), per layer
# Kept per token and block: the groups' inputs (qkv 64, o 64, gate/up 64, down 128), the layers' outputs (q 64,
# k 32, v 32, o 64, gate 128, up 128, down 64), the residual into the two norms (2 x 64) and the MLP's activation (128)
SAVED = (64 + 64 + 64 + 128) + (64 + 32 + 32 + 64 + 128 + 128 + 64) + 2 * 64 + 128
BATCH, SEQLEN = 2, 16
TOKENS = BATCH * SEQLEN
ROTARY = 2 * 16 * 4 + 8  # a block's other arguments per token: cos and sin of a head's 16 dimensions, a position


def planned(model: Path, **ft: object) -> dict[str, int]:
    config = PlanConfig(4, SEQLEN, batch_size=BATCH, timed=False, finetune=FinetunePlan(**ft))  # type: ignore[arg-type]
    return make_plan(str(model), config, CPU).stages["finetune"].device


def test_full_finetune_terms_are_the_formulas(tiny_llama_dir: Path) -> None:
    terms = planned(tiny_llama_dir)
    assert PARAMS == 107_328
    assert terms["weights (float32)"] == terms["gradients"] == terms["teacher weights"] == 4 * PARAMS
    assert terms["AdamW moments"] == 2 * 4 * PARAMS
    assert terms["masks"] == PRUNED  # a bool per pruned weight
    assert terms["activations"] == 2 * SAVED * TOKENS * 4 + TOKENS * ROTARY
    assert terms["final hidden states"] == 2 * TOKENS * 64 * 4
    chunk = BATCH * (SEQLEN - 1) * 260 * 4  # one chunk of float32 logits (all 15 predicted positions)
    assert terms["logits chunk"] == terms["teacher logits chunk"] == 3 * chunk
    assert terms["teacher final hidden states"] == TOKENS * 64 * 4
    assert "adapters" not in terms


def test_lora_checkpointing_and_no_teacher_terms(tiny_llama_dir: Path) -> None:
    terms = planned(tiny_llama_dir, lora=4, teacher=False, gradient_checkpointing=True)
    assert terms["weights (float32)"] == 4 * PARAMS and terms["masks"] == PRUNED
    assert terms["adapters"] == terms["adapter gradients"] == 4 * ADAPTERS
    assert terms["AdamW moments"] == 2 * 4 * ADAPTERS
    assert "gradients" not in terms and not any(k.startswith("teacher") for k in terms)
    assert terms["block inputs (checkpointed)"] == 2 * TOKENS * (64 * 4 + ROTARY)
    # one block recomputed: its activations; the widest layer's W + s (B A) * M and its update's gradient, made again
    assert terms["one block's activations (recomputed)"] == SAVED * TOKENS * 4
    assert terms["one layer's update (backward)"] == 128 * 64 * (4 + 4)


def autograd_keeps(model: torch.nn.Module, windows: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward pass of the decoder (parameters and buffers aside)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.get_decoder()(input_ids=windows, use_cache=False)  # type: ignore[operator]
    return sum(kept.values())


@pytest.mark.parametrize("lora", [None, 4], ids=["full", "lora"])
def test_the_activations_are_what_autograd_keeps(tiny_llama_dir: Path, lora: int | None) -> None:
    from transformers import AutoModelForCausalLM

    from stade_cli.stages.finetune.lora import attach

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train()
    if lora is not None:
        linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        attach(model, {n: m.weight != 0 for n, m in linear.items()}, lora)
    else:
        model.requires_grad_(True)
    terms = planned(tiny_llama_dir, lora=lora)
    plan = terms["activations"] + terms["final hidden states"]
    got = autograd_keeps(model, torch.randint(0, 260, (BATCH, SEQLEN), generator=torch.Generator().manual_seed(0)))
    assert 0.95 * got < plan < 1.25 * got, (plan, got)  # LoRA keeps less: frozen norms need not their inputs


def test_plan_prints_the_finetune_row_and_its_disk(tiny_llama_dir: Path) -> None:
    args = ["plan", tiny_llama_dir, "--seqlen", SEQLEN, "--device", "cpu", "--finetune", "--lora", 8]
    res = invoke(*args, "--tokens", 4096, "--patience", "--json")
    assert res.exit_code == 0, res.output
    ft = json.loads(res.stdout)["stages"]["finetune"]
    assert ft["disk_bytes"] == PARAMS * 4 + plan_memory.SMALL_FILES  # the checkpoint in its own dtype (float32)
    adapters = 2 * ADAPTERS  # rank 8
    assert ft["scratch_disk_bytes"] == 2 * 4 * 4 * adapters  # state: adapters, 2 moments, best; twice while replaced
    assert ft["host_terms"]["best weights (a copy)"] == 4 * adapters
    assert ft["seconds_estimate"] is not None and ft["seconds_estimate"] > 0
    res = invoke(*args[:-2])
    assert res.exit_code == 0 and "finetune" in res.output
    res = invoke("plan", tiny_llama_dir, "--device", "cpu", "--lora", 8)
    assert res.exit_code == 1 and "add --finetune" in res.output
