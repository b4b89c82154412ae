"""
Flags and checks (machinery/flags.py, cli.py, hub.py, loading.py): bad input is one clear error, at once.
"""

import os
import re
import shutil
import socket
from dataclasses import fields

# Before huggingface_hub reads it (at import): the tests never touch the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

import grpo  # noqa: E402
import rewards  # noqa: E402
from grpo import (  # noqa: E402
    Config,
)
from machinery import devices, loading  # noqa: E402
from machinery.flags import ConfigError  # noqa: E402
from tests.conftest import (  # noqa: E402
    CHAT_TEMPLATE,
    check_flags,
    parse_flags,
    run_main,
    tiny_config,
    write_jsonl,
)


def test_help_lists_every_config_field():
    result = run_main("--help")
    assert result.returncode == 0
    for f in fields(Config):
        assert "--" + f.name.replace("_", "-") in result.stdout


def test_help_shows_choices_defaults_and_examples_whole():
    result = run_main("--help")
    help_text = result.stdout
    for choices in (
        "{k1,k2,k3,k3_ratio,k1_to_go,k1_is}",
        "{grpo,dapo,dr_grpo,cispo,bnpo}",
        "{token,sequence}",
        "{auto,fp32,bf16}",
        "{auto,cuda,mps,cpu}",
    ):
        assert choices in help_text
    assert grpo.LORA_TARGETS in help_text  # a long default, not broken across lines
    assert "(default: unset)" in help_text and "(default: None)" not in help_text
    assert "(default: on)" in help_text and "(default: True)" not in help_text
    assert (
        "Example, nothing from the Hub: python grpo.py --model ./chat-model --dataset arithmetic"
        in " ".join(help_text.split())
    )


def test_command_line_mistakes_exit_2_with_one_clear_line(tiny_model_dir, tmp_path):
    """A negative number is a value, not a flag (and check_config says why it is wrong); a prefix of a flag is no
    flag; argparse's errors and ours exit alike, with 2."""
    negative = run_main(
        "--learning-rate", "-1e-6", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path)
    )
    assert (
        negative.returncode == 2 and "--learning-rate is -1e-06; it must be > 0." in negative.stderr
    )
    assert run_main("--beta", "-.5", "--model", str(tiny_model_dir)).stderr.startswith(
        "grpo.py: error: --beta is -0.5"
    )
    prefix = run_main("--num-generation", "4")
    assert prefix.returncode == 2 and "unrecognized arguments: --num-generation 4" in prefix.stderr
    assert run_main("--loss-type", "ppo").returncode == 2
    assert parse_flags(["--lora-target-modules", "q_proj", "--seed", "-3"]).seed == -3


def test_a_local_folder_is_a_folder_and_a_path_is_never_a_hub_id(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A relative folder without ./ loads as a folder; a missing one that no Hub id could be (two slashes) is "no
    such folder" at once, before any loading."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    check_flags(Config(model="models/tiny", dataset="arithmetic"))
    assert loading.load_tokenizer("models/tiny") is not None
    for missing in ("offline-models/SmolLM2/x", "models\\tiny2"):
        with pytest.raises(
            ConfigError, match=re.escape(f"--model {missing!r}: no such model folder")
        ):
            check_flags(Config(model=missing, dataset="arithmetic"))
    with pytest.raises(ConfigError) as refused:
        check_flags(Config(model="models/tiny", dataset="data/train.jsonl"))
    assert str(refused.value) == (
        "--dataset 'data/train.jsonl': no such data file or folder. Check the path, or "
        "pass a Hub id."
    )


def test_without_the_hub_hub_ids_load_from_the_cache_at_once_and_say_what_to_do(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """The libraries retry an unreachable Hub for about a minute; one quick look instead (seen here: 48 s before
    the error, now a second), then the cache only, and a missing model names the ways to go on without the Hub."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    looked = []

    def unreachable(address, timeout):
        looked.append((address, timeout))
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    check_flags(
        Config(model="nobody/no-such-model", dataset="arithmetic3")
    )  # a built-in task: no Hub id
    assert looked == [(("huggingface.co", 443), 3)]
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert capsys.readouterr().out == (
        "note: huggingface.co cannot be reached: --model nobody/no-such-model from the "
        "cache only. Without the Hub: --model ./folder, --dataset arithmetic or a "
        "JSON-lines file.\n"
    )
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    check_flags(
        Config(model="nobody/no-such-model", dataset="nobody/data")
    )  # both named, once each
    assert (
        "--model nobody/no-such-model, --dataset nobody/data from the cache only"
        in capsys.readouterr().out
    )
    looked.clear()
    with pytest.raises(ConfigError, match="--model 'nobody/no-such-model' cannot be loaded"):
        loading.load_tokenizer("nobody/no-such-model")
    assert looked == []  # the cache only: no connection tried, so no minute of retries
    looked.clear()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    check_flags(Config(model=str(tiny_model_dir), dataset="arithmetic"))  # no Hub id: no look
    assert (
        looked == []
        and not huggingface_hub.constants.HF_HUB_OFFLINE
        and capsys.readouterr().out == ""
    )


# Bad input: a clear error before any long work


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_generations=1), "--num-generations is 1"),
        (dict(micro_batch_size=0), "--micro-batch-size is 0"),
        (dict(max_completion_length=0), "--max-completion-length is 0"),
        (dict(max_steps=-1), "--max-steps is -1"),
        (dict(loss_type="ppo"), "--loss-type 'ppo' is unknown"),
        (dict(kl_estimator="k9"), "--kl-estimator 'k9' is unknown"),
        (dict(temperature=0.0), "--temperature is 0.0"),
        (dict(model="./no/such/model"), "no such model folder"),
        (dict(dataset="missing.jsonl"), "no such data file or folder"),
        (
            dict(resume=True),
            "holds no run \\(no checkpoint-\\*, no metrics.jsonl\\)\\. Drop --resume",
        ),
        (dict(lora_r=8, ref_sync_every=10), "--ref-sync-every needs full fine-tuning"),
    ],
)
def test_bad_config_is_rejected_at_once(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        grpo.train(tiny_config(tiny_model_dir, tmp_path, **overrides))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_device_this_machine_lacks_is_rejected_at_once(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without them
    monkeypatch.setattr(torch.mps, "is_available", lambda: False)
    for device in ("cuda", "mps"):
        with pytest.raises(ConfigError, match=f"--device {device}: .*Use --device auto"):
            grpo.train(tiny_config(tiny_model_dir, tmp_path, device=device))
    assert not (tmp_path / "run").exists()


def test_unloadable_model_and_bad_data_fail_with_a_clear_message(tiny_model_dir, tmp_path):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    result = run_main(
        "--model", str(not_a_model), "--dataset", "arithmetic", "--output-dir", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is no model folder: it has no config.json, safetensors weights" in result.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "?", "a": "1"}])
    result = run_main(
        "--model", str(tiny_model_dir), "--dataset", str(bad), "--output-dir", str(tmp_path / "o")
    )
    assert (
        "lacks the key(s) ['answer', 'question']" in result.stderr
    )  # data is checked before the model loads
    result = run_main("--num-generations", "1")
    assert result.returncode != 0 and "--num-generations is 1" in result.stderr


def test_a_chat_template_without_a_system_role_is_a_clear_error(tiny_model_dir, tmp_path):
    no_system = tmp_path / "no-system"
    tokenizer = loading.load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}" + CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(no_system)
    prompt = rewards.make_prompt("What is 1 + 1?")  # the task's: a system prompt, a question
    with pytest.raises(ConfigError) as error:
        loading.load_tokenizer(str(no_system), False, prompt)
    assert str(error.value) == (
        f"--model {str(no_system)!r}: its chat template cannot format a system prompt and a "
        "question (System role not supported). Use another chat model."
    )
    # The check formats as sampling does, with the assistant's turn opened: a template failing only there is caught.
    tokenizer.chat_template = (
        "{% if add_generation_prompt %}{{ raise_exception('no reply turn') }}{% endif %}"
    )
    tokenizer.save_pretrained(no_system)
    with pytest.raises(ConfigError, match=r"\(no reply turn\)"):
        loading.load_tokenizer(str(no_system), False, prompt)


@pytest.mark.parametrize(
    "family, plain, transformed",
    [
        (
            "granite",
            dict(logits_scaling=1.0),
            dict(logits_scaling=4.0),
        ),  # Granite divides its logits by a scale
        # Gemma 2 soft-caps them: cap * tanh(logits / cap), with a cap far below this random model's logits so that it bites
        (
            "gemma2",
            dict(final_logit_softcapping=None, head_dim=8),
            dict(final_logit_softcapping=0.01, head_dim=8),
        ),
    ],
)
def test_a_model_that_transforms_its_logits_is_refused(tmp_path, family, plain, transformed):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for settings, refused in ((plain, False), (transformed, True)):
        torch.manual_seed(0)
        path = tmp_path / f"{family}-{refused}"
        AutoModelForCausalLM.from_config(
            AutoConfig.for_model(family, **sizes, **settings)
        ).save_pretrained(path)
        if refused:
            with pytest.raises(ConfigError, match="transforms its logits after the output layer"):
                loading.load_model(str(path), torch.device("cpu"))
        else:
            loading.load_model(
                str(path), torch.device("cpu")
            )  # the same family without the transform loads


def test_a_model_whose_decoder_cannot_be_reached_is_refused(tiny_model_dir, monkeypatch):
    # As GPT-2 under older transformers: get_decoder() returns the whole model, whose output has no hidden state.
    monkeypatch.setattr(LlamaForCausalLM, "get_decoder", lambda self: self)
    with pytest.raises(ConfigError, match="its decoder or output layer cannot be reached"):
        loading.load_model(str(tiny_model_dir), torch.device("cpu"))


@pytest.mark.filterwarnings(
    "ignore:.*CUDA is not available"
)  # torch.autocast("cuda") without one (2.7: "User provided...")
@pytest.mark.parametrize(
    "native_bf16, emulated_bf16, expected",
    [
        (True, True, torch.bfloat16),  # compute capability 8.0 and later: A100, L4, RTX 30xx, H100
        (False, True, None),  # T4, V100: torch emulates bf16, but auto picks fp32
        (False, False, None),
    ],
)
def test_precision_auto_is_bf16_only_on_gpus_that_compute_in_bf16(
    monkeypatch, native_bf16, emulated_bf16, expected
):
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: native_bf16 or (including_emulation and emulated_bf16),
    )
    autocast = devices.autocast_for(torch.device("cuda"), "auto")
    assert getattr(autocast, "fast_dtype", None) == expected
    if (
        native_bf16 or emulated_bf16
    ):  # asked for; on a real GPU with no bf16 at all torch refuses it
        assert (
            getattr(devices.autocast_for(torch.device("cuda"), "bf16"), "fast_dtype", None)
            == torch.bfloat16
        )
    assert getattr(devices.autocast_for(torch.device("cpu"), "auto"), "fast_dtype", None) is None


def test_load_tokenizer_runs_no_remote_code_unless_asked_and_pads_with_eos(
    tiny_model_dir, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    asked = []
    load = AutoTokenizer.from_pretrained
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", lambda name, **kw: asked.append(kw) or load(name, **kw)
    )
    loading.load_tokenizer(str(tiny_model_dir))
    loading.load_tokenizer(str(tiny_model_dir), trust_remote_code=True)
    assert asked == [{"trust_remote_code": False}, {"trust_remote_code": True}]
    no_pad = tmp_path / "no-pad"
    tokenizer = load(str(tiny_model_dir))
    tokenizer.pad_token = None
    tokenizer.save_pretrained(no_pad)
    assert (
        load(str(no_pad)).pad_token is None
        and loading.load_tokenizer(str(no_pad)).pad_token == "<|im_end|>"
    )
    with pytest.raises(ConfigError) as refused:
        loading.load_tokenizer(str(tmp_path / "empty"))
    assert str(refused.value).endswith(
        "Pass a Hub id or a local folder with config.json, weights and tokenizer."
    )


def test_an_output_dir_that_is_a_file_is_refused_before_any_loading(
    tiny_model_dir, tmp_path, monkeypatch
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    monkeypatch.setattr(grpo, "load_tokenizer", lambda *a: pytest.fail("a tokenizer was loaded"))
    result = run_main(
        "--model", str(tiny_model_dir), "--dataset", "arithmetic", "--output-dir", str(a_file)
    )
    assert result.returncode == 2 and f"--output-dir {a_file} is a file" in result.stderr


def test_a_model_folder_without_a_model_names_what_it_lacks(tiny_model_dir, tmp_path):
    """Not transformers' guess ("You need to have sentencepiece or tiktoken installed")."""
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_model_dir / "config.json", partial / "config.json")
    with pytest.raises(ConfigError) as refused:
        check_flags(Config(model=str(partial), dataset="arithmetic"))
    assert "has no safetensors weights (model.safetensors), a tokenizer (tokenizer.json)" in str(
        refused.value
    )
    assert "no config.json" not in str(refused.value)  # it has one: not named
    check_flags(Config(model=str(tiny_model_dir), dataset="arithmetic"))  # a whole one passes
