"""
The prompts' cache and the compiled decoding step (--compile): the eager loop's tokens, once per shape.
"""

import os

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import (  # noqa: E402
    generate_completions,
)
from machinery import decoding, devices, logs  # noqa: E402
from machinery.decoding import prompt_cache  # noqa: E402
from tests.conftest import build_tiny_chat_model, parse_flags, tiny_config  # noqa: E402


def test_prompt_cache_gives_the_plain_forward_pass(lively):
    """Each prompt run once, its cache repeated G times, then its last token fed: the logits must
    be those of a full forward pass over the G copies, with left padding on the shorter prompt."""
    model, tokenizer = lively
    texts = [
        tokenizer.apply_chat_template(
            rewards.make_prompt(q), tokenize=False, add_generation_prompt=True
        )
        for q in ("What is 1 + 2?", "What is 33 + 4 + 5 + 6?")
    ]
    encoded = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    ids, mask = (
        encoded.input_ids.repeat_interleave(3, dim=0),
        encoded.attention_mask.repeat_interleave(3, dim=0),
    )
    assert mask[:3].eq(0).any()  # the first prompt is padded
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[
            :, -1
        ]  # [6, V]
        cache = prompt_cache(model, encoded.input_ids, encoded.attention_mask, 3)
        cached = model(
            input_ids=ids[:, -1:],
            attention_mask=mask,
            position_ids=position_ids[:, -1:],
            cache=cache,
        ).logits[:, -1]  # [6, V]
    assert (plain[0] - plain[3]).abs().max() > 0.1  # the two prompts give different logits
    # float32, the same products split differently (the cache, then one token): ~1e-6 of logits ~1
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)


# torch.compile's own tracing touches torch.jit, which torch 2.13 marks deprecated: torch's notice, not a call of ours.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_the_compiled_decoding_step_draws_the_eager_loops_tokens_and_compiles_once_per_shape(
    lively,
):
    """--compile: a static cache padded to a multiple of 256 slots and a compiled step. Greedy and
    sampled tokens as the eager loop's (itself equal to generate(), above), for prompts of several
    lengths, two end-of-reply ids, B = 3 x 5, before and after an AdamW step (the weights change in
    place: the compiled step must read them anew); it really compiles (else equality were trivial);
    a new batch of the same B compiles nothing more; another B frees the first B's caches."""
    model, tokenizer = lively
    questions = ["What is 1 + 2?", "What is 33 + 4 + 5 + 6?", "What is 7 + 8 + 9?", "What is 4?"]
    prompts = [rewards.make_prompt(q) for q in questions]
    stop = int(generate_completions(model, tokenizer, prompts[:1], 1, 8, 0.0).completion_ids[0, 3])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    graphs = torch._dynamo.utils.counters["stats"]
    weights = {name: value.clone() for name, value in model.state_dict().items()}
    try:
        compiled_before = graphs["unique_graphs"]
        for stepped in (False, True):
            if stepped:  # one AdamW step of a real loss: every weight moves
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
                model.train()
                ids = torch.randint(0, len(tokenizer), (3, 6))
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                model.eval()
            for temperature in (0.0, 1.0):
                runs = []
                for compiled in (False, True):
                    torch.manual_seed(0)
                    runs.append(
                        generate_completions(
                            model, tokenizer, prompts[:3], 5, 12, temperature, compiled=compiled
                        )
                    )
                eager, fast = runs
                # Sampled draws could part only where u falls within ~1e-6 (the compiled kernels' rounding
                # of the logits) of a CDF boundary: about B * T * 1e-6 = 2e-4 of a chance in this test.
                assert torch.equal(eager.completion_ids, fast.completion_ids), (
                    stepped,
                    temperature,
                )
                assert torch.equal(eager.completion_mask, fast.completion_mask)
                assert eager.texts == fast.texts and torch.equal(eager.truncated, fast.truncated)
            if not stepped:
                assert (
                    graphs["unique_graphs"] > compiled_before
                )  # dynamo compiled the step, not fell back
                first_texts = eager.texts
        assert eager.texts != first_texts  # the step changed what the model says
        assert (
            eager.prompt_mask.eq(0).any() and eager.completion_mask.eq(0).any()
        )  # padding; an end
        before = graphs["unique_graphs"]
        other = generate_completions(
            model, tokenizer, [prompts[0], *prompts[2:]], 5, 12, 0.0, compiled=True
        )
        assert (
            other.prompt_ids.shape[1] != eager.prompt_ids.shape[1]
        )  # another prompt length, same B
        assert graphs["unique_graphs"] == before  # no compilation
        _, caches, shapes = decoding.compiled_decoder(model)
        assert {key[0] for key in caches} == {15}
        generate_completions(
            model, tokenizer, prompts[:1], 2, 12, 0.0, compiled=True
        )  # B = 2: say, evaluation
        assert {key[0] for key in caches} == {2} and {key[0] for key in shapes} == {
            2,
            15,
        }  # B = 15's freed
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.load_state_dict(weights)
        decoding.compiled_decoder.cache_clear()


def test_compiled_decoding_says_when_it_passes_the_recompile_limit(lively, monkeypatch, capsys):
    """Past dynamo's limit of compilations, the step runs uncompiled, slower than the plain loop: said, once."""
    model, tokenizer = lively
    seen = set()
    monkeypatch.setattr(
        decoding, "compiled_decoder", lambda m: (m.get_decoder(), {}, seen)
    )  # no compiling here
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 2)
    prompt = [rewards.make_prompt("What is 1 + 2?")]
    for batch in (1, 2, 1, 2):
        generate_completions(model, tokenizer, prompt, batch, 2, 0.0, compiled=True)
    assert (
        "--compile" not in capsys.readouterr().out
    )  # two shapes, each compiled once: within the limit
    for batch in (3, 4):
        generate_completions(model, tokenizer, prompt, batch, 2, 0.0, compiled=True)
    logs.say_once.cache_clear()
    assert (
        capsys.readouterr().out.count(
            "--compile: more batch shapes than torch compiles for one function"
        )
        == 1
    )


def test_a_sliding_window_model_decodes_eager_with_compile(tmp_path, capsys):
    """A sliding-window layer's cache keeps the last W - 1 of a longer prompt: copied into a static cache it would
    start at the wrong place. With --compile such a model decodes eager (the tokens of generate()), and says so."""
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = (
        build_tiny_chat_model(tmp_path / "tok"),
        PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"),
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(
        MistralConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=16,
            initializer_range=0.2,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    prompts = [
        rewards.make_prompt(q) for q in ("What is 33 + 4 + 5 + 6?", "What is 1 + 2?")
    ]  # > the window; padded
    # (without the guard, seen: the 2 rows of the padded prompt differ from generate(); every step compiled anew)
    compiled = generate_completions(model, tokenizer, prompts, 2, 8, 0.0, compiled=True)
    assert compiled.prompt_ids.shape[1] > 4 * 16
    with torch.no_grad():
        plain = model.generate(
            input_ids=compiled.prompt_ids,
            attention_mask=compiled.prompt_mask,
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
    assert torch.equal(
        compiled.completion_ids,
        plain[:, compiled.prompt_ids.shape[1] :][:, : compiled.completion_ids.shape[1]],
    )
    assert "sliding-window attention layers: decoding runs eager" in capsys.readouterr().out
    logs.say_once.cache_clear()


@pytest.mark.parametrize(
    "triton, capability, expected",
    [
        (True, (9, 0), True),  # H100: decoding 5x faster compiled (bench/README.md)
        (True, (7, 0), True),  # V100, Triton's oldest
        (True, (6, 0), False),  # P100: Triton cannot compile for it
        (False, (9, 0), False),  # no Triton (torch's CUDA wheels on Windows): torch.compile fails
    ],
)
def test_compile_unset_is_on_for_cuda_gpus_that_triton_compiles_for(
    monkeypatch, triton, capability, expected
):
    real_find_spec = devices.importlib.util.find_spec
    monkeypatch.setattr(
        devices.importlib.util,
        "find_spec",
        lambda name: (object() if triton else None) if name == "triton" else real_find_spec(name),
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert devices.compiles_by_default(torch.device("cuda")) is expected
    assert not devices.compiles_by_default(torch.device("cpu"))  # slower on CPUs; MPS untried
    assert not devices.compiles_by_default(torch.device("mps"))


def test_compile_unset_is_settled_by_train_before_anything_uses_it(tiny_model_dir, tmp_path):
    assert [parse_flags(flags).compile for flags in ([], ["--compile"], ["--no-compile"])] == [
        None,
        True,
        False,
    ]
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, eval_size=0)
    assert cfg.compile is None and grpo.train(cfg)["config"]["compile"] is False  # on a CPU: off
