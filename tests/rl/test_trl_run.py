"""A real TRL GRPO run from batchpilot's export: a tiny Llama built from a config, a BPE trained here, a
rule-based reward, CPU; the batch sizes TRL runs are the plan's (slow: ~1 minute)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchpilot.rl.batch import RLBatch
from batchpilot.rl.exports import export_text
from batchpilot.rl.plan import RLPlanRequest, plan_rl
from batchpilot.specs.hardware import load_accelerator
from batchpilot.specs.model import load_model

pytestmark = pytest.mark.slow

PROMPTS = ["count the letters: ", "say something short: ", "write a word: ", "repeat after me: "]


def _tokenizer(tmp_path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 10 + ["aaaa bbbb the a an and"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left")


def test_trl_grpo_runs_the_exported_batches(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl", reason="the optional extra `rl` installs TRL")
    datasets = pytest.importorskip("datasets")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # The plan: 4 prompts × group 4 = 16 samples per rollout, 2 updates of 8, on one process.
    req = RLPlanRequest(model=load_model("tiny-llama-1m"), gpu=load_accelerator("h100-sxm"), gpus=1,
                        batch=RLBatch(prompts_per_rollout=4, group_size=4, samples_per_update=8),
                        max_prompt_tokens=16, max_response_tokens=8, framework="trl", reference=False)
    plan = plan_rl(req)
    kwargs = json.loads(export_text(plan, "trl"))
    per_step = kwargs["per_device_train_batch_size"]
    assert per_step * kwargs["gradient_accumulation_steps"] == 8 and per_step * kwargs["steps_per_generation"] == 16

    torch.manual_seed(0)
    tokenizer = _tokenizer(tmp_path)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    seen: list[int] = []

    def reward_letters(completions: list[str], **_: object) -> list[float]:
        """Rule-based: the share of the letter 'a' in the completion."""
        seen.append(len(completions))
        return [c.count("a") / max(1, len(c)) for c in completions]

    cpu = {**kwargs, "bf16": False, "use_cpu": True, "use_vllm": False, "gradient_checkpointing": False}
    config = trl.GRPOConfig(output_dir=str(tmp_path / "out"), report_to=[], max_steps=4, logging_steps=1,
                            save_strategy="no", learning_rate=1e-3, seed=0, **cpu)
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS * 4})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_letters, args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train()

    assert trainer.state.global_step == 4                          # 4 optimizer updates = 2 rollouts
    assert config.generation_batch_size == plan.batch.samples_per_rollout == 16
    assert seen == [16, 16]                                         # each rollout scored 16 completions at once
    updates_per_generation = config.steps_per_generation // config.gradient_accumulation_steps
    assert updates_per_generation == plan.batch.updates_per_rollout == 2
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 4
