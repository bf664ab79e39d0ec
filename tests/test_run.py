"""The run folder (moorelm.run): what it refuses, what it replaces, and LoRA runs exported whole."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import moorelm
from moorelm.cli import main
from moorelm.codecs import MODEL_FILE, LMCodec, model_tensors, read_header, read_tensors
from moorelm.config import ModelConfig
from moorelm.errors import MoorelmError
from moorelm.finetune.lora import LoRAConfig, apply_lora
from moorelm.interop.hf import export_hf, hf_state_dict
from moorelm.model import GPT
from moorelm.run import RunFolder
from moorelm.tokenizer import Tokenizer
from tests.conftest import SMALL_TEXT

TOK = Tokenizer.train([SMALL_TEXT], "char")


def _run(path, seed: int = 0, step: int = 3, **model) -> RunFolder:
    """A run folder with a random GPT-2-style model (exportable) and a char tokenizer."""
    cfg = ModelConfig(**{"vocab_size": TOK.vocab_size, "seq_len": 16, "n_layer": 2, "n_head": 2,
                         "n_embd": 16, **model})
    torch.manual_seed(seed)
    run = RunFolder(path)
    run.write_files({"model": cfg.to_dict()}, TOK)
    run.save(step, LMCodec().checkpoint_files(GPT(cfg)), {"tokens": 0, "elapsed": 0.0})
    return run


def _edit_config(run: RunFolder, **changes) -> None:
    cfg = json.loads(run.config_path.read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    run.config_path.write_text(json.dumps(cfg))


def _one_line(capsys, argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


# ----------------------------------------------------------------------------- LoRA exports


def _pairs(path):
    rows = [{"prompt": f"{i} + {i}", "completion": f"{2 * i}"} for i in range(24)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_export_of_separate_lora_adapters_is_the_adapted_model(tiny_run, tmp_path):
    """A run fine-tuned with adapters kept separate exports what moorelm.load computes (the
    adapters merged in), not the base weights alone."""
    from moorelm.finetune.sft import finetune

    out = tmp_path / "ft"
    finetune(tiny_run, _pairs(tmp_path / "p.jsonl"), out, eval_rows=4,
             lora=LoRAConfig(rank=2, merged=False),
             train_overrides={"max_steps": 3, "batch_size": 4, "lr": 0.05, "threads": 1},
             exact_match_rows=0, progress=False)
    export_hf(out, tmp_path / "hf")
    exported = read_tensors(tmp_path / "hf" / "model.safetensors")
    adapted = hf_state_dict(moorelm.load(out, device="cpu").model)
    base = hf_state_dict(moorelm.load(tiny_run, device="cpu").model)
    assert all(torch.equal(exported[k], adapted[k]) for k in adapted)
    assert any(not torch.equal(exported[k], base[k]) for k in base)


def test_an_interrupted_lora_run_exports_its_adapted_model(tiny_run, tmp_path, capsys):
    """A LoRA run killed mid-training (after a checkpoint) exports through the CLI, adapters
    merged in; no traceback on adapter tensor names."""
    from moorelm.training.loop import train

    base = RunFolder(tiny_run).load()
    lcfg = LoRAConfig(rank=2)

    class Killed(Exception):
        pass

    def kill_at(step: int) -> None:
        if step == 3:
            raise Killed

    cfg = base.config
    from moorelm.config import TrainConfig

    tcfg = TrainConfig.from_dict({**cfg["train"], "max_steps": 6, "ckpt_interval": 2, "lr": 0.05,
                                  "eval_interval": 0})
    with pytest.raises(Killed):
        train(base.model.config, tcfg, cfg["data"]["dir"], tmp_path / "lora", progress=False,
              init_weights=model_tensors(base.model), model_hook=lambda m: apply_lora(m, lcfg),
              run_meta={"lora": lcfg.to_dict()}, on_step=kill_at)
    assert main(["export", str(tmp_path / "lora"), str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    exported = read_tensors(tmp_path / "hf" / "model.safetensors")
    adapted = hf_state_dict(moorelm.load(tmp_path / "lora", device="cpu").model)
    assert all(torch.equal(exported[k], adapted[k]) for k in adapted)


# ----------------------------------------------------------------------------- never lose files


def test_train_and_import_refuse_a_folder_that_is_not_a_run(tmp_path, small_corpus, capsys):
    """train --out and import into a non-empty folder that is not a run refuse in one line
    (import even with --force) and leave the user's files alone."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _one_line(capsys, ["train", "--out", str(mine), "--corpus", str(small_corpus),
                       "--max-steps", "1", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                       "--seq-len", "16", "--batch-size", "2", "--threads", "1", "--quiet"],
              "not a moorelm run folder")
    export_hf(_run(tmp_path / "a").path, tmp_path / "hf")
    _one_line(capsys, ["import", str(tmp_path / "hf"), str(mine), "--force"],
              "not a moorelm run folder")
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"


def test_import_force_replaces_the_whole_run(tmp_path, capsys):
    """import --force over a trained run leaves only the imported run: its one checkpoint,
    its weights, none of the old run's files."""
    source = _run(tmp_path / "a", seed=1)
    export_hf(source.path, tmp_path / "hf")
    old = _run(tmp_path / "b", seed=2, step=500)
    (old.path / "metrics.csv").write_text("step\n500\n")
    _one_line(capsys, ["import", str(tmp_path / "hf"), str(old.path)], "--force")
    assert main(["import", str(tmp_path / "hf"), str(old.path), "--force"]) == 0
    assert [p.name for p in old.checkpoints()] == ["step-00000000"]
    assert not (old.path / "metrics.csv").exists()
    got = model_tensors(old.load().model)
    want = model_tensors(source.load().model)
    assert all(torch.equal(got[k], want[k]) for k in want)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from moorelm.run import RunFolder
    lock = RunFolder(sys.argv[1]).lock()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_a_run_held_by_another_process_is_refused(tiny_run, tmp_path, capsys):
    """While another process holds a run folder, training it (here: resuming) and importing
    over it fail with one line naming that process; once it is gone the folder is free."""
    from moorelm.training.pretrain import pretrain

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(MoorelmError, match=rf"in use by another moorelm process \(pid {proc.pid}\)"):
            pretrain(run, resume=True, train_overrides={"max_steps": 22}, progress=False)
        export_hf(_run(tmp_path / "a").path, tmp_path / "hf")
        _one_line(capsys, ["import", str(tmp_path / "hf"), str(run), "--force"], "in use")
    finally:
        proc.kill()
        proc.wait()
    with RunFolder(run).lock():
        pass


# ----------------------------------------------------------------------------- bounded loads


@pytest.mark.parametrize("changes,needle", [
    ({"model.n_layer": 1_000_000}, "n_layer=1000000"),
    ({"model.n_embd": 2**40}, "wte.weight"),
    ({"model.vocab_size": 10**12}, "vocab_size=1000000000000"),
], ids=["n_layer", "n_embd", "vocab_size"])
def test_config_sizes_are_checked_against_the_weights_first(tmp_path, changes, needle):
    """Sizes in config.json that the weights do not have are refused in one line before a
    model is built (no hang on a million layers, no terabyte allocation)."""
    run = _run(tmp_path / "r")
    _edit_config(run, **changes)
    with pytest.raises(MoorelmError, match=needle):
        moorelm.load(run.path, device="cpu")


def test_rotary_context_is_bounded(tmp_path):
    """A rotary model whose seq_len would need rotary tables far beyond its weights is refused."""
    run = _run(tmp_path / "r", pos="rope", norm="rmsnorm", mlp="swiglu")
    _edit_config(run, **{"model.seq_len": 10**12})
    with pytest.raises(MoorelmError, match="rotary tables"):
        moorelm.load(run.path, device="cpu")


def test_weights_and_tokenizer_that_do_not_fit_are_refused(tmp_path):
    """Non-floating weights, NaN weights, and a tokenizer smaller than the model's vocabulary
    each fail at load with one line."""
    run = _run(tmp_path / "r")
    ck = run.latest()
    good = read_tensors(ck / MODEL_FILE)
    for name, tensors, needle in [
        ("int", {**good, "wte.weight": good["wte.weight"].long()}, "dtype I64"),
        ("nan", {**good, "ln_f.weight": torch.full_like(good["ln_f.weight"], float("nan"))},
         "NaN or infinite"),
    ]:
        bad = RunFolder(tmp_path / name)
        shutil.copytree(run.path, bad.path)
        bad.save(3, {MODEL_FILE: (tensors, {"kind": "lm"})}, {"tokens": 0, "elapsed": 0.0})
        with pytest.raises(MoorelmError, match=needle):
            moorelm.load(bad.path, device="cpu")
    Tokenizer.train(["ab"], "char").save(run.tokenizer_path)
    with pytest.raises(MoorelmError, match="tokenizer is not this run's"):
        moorelm.load(run.path, device="cpu")


@pytest.mark.parametrize("template", [5, "no placeholder", ["{prompt}"]])
def test_a_stored_prompt_template_is_checked_on_load(tmp_path, capsys, template):
    """A prompt_template that is not a string holding {prompt} fails load and generate in one line."""
    run = _run(tmp_path / "r")
    _edit_config(run, prompt_template=template)
    with pytest.raises(MoorelmError, match="prompt_template"):
        moorelm.load(run.path, device="cpu")
    _one_line(capsys, ["generate", str(run.path), "--prompt", "x", "--max-new-tokens", "2"],
              "prompt_template")


def test_checkpoints_record_their_kind_and_unknown_tensors_are_one_line(tmp_path):
    """model.safetensors says what kind of model it holds; a tensor no codec expects is named
    in one line."""
    run = _run(tmp_path / "r")
    assert read_header(run.latest() / MODEL_FILE)[1] == {"step": "3", "format": "moorelm-1",
                                                         "kind": "lm"}
    tensors = read_tensors(run.latest() / MODEL_FILE)
    run.save(4, {MODEL_FILE: ({**tensors, "blocks.0.mystery": torch.zeros(2)}, {"kind": "lm"})},
             {"tokens": 0, "elapsed": 0.0})
    with pytest.raises(MoorelmError, match="unexpected.*blocks.0.mystery"):
        moorelm.load(run.path, device="cpu")


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("where", ["moorelm.run.save_file", "moorelm.atomic.fsync_file"])
def test_a_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    """ENOSPC while a checkpoint is written (a tensor file, or the fsync before the rename) is
    one line saying the disk is full; the previous checkpoint is still the newest, complete
    and loadable, and no half-written folder is left behind."""
    import errno
    import os

    run = _run(tmp_path / "r", step=3)
    before = read_tensors(run.latest() / MODEL_FILE)
    model = GPT(run.model_config())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(where, full)
    with pytest.raises(MoorelmError, match="no space left on the device") as e:
        run.save(4, LMCodec().checkpoint_files(model), {"tokens": 0, "elapsed": 0.0})
    assert "\n" not in str(e.value)
    # step 3 is kept, and the same command without --resume would be refused: say so
    assert str(e.value).endswith("free some space and run the same command with --resume")
    monkeypatch.undo()
    assert [p.name for p in run.checkpoints()] == ["step-00000003"]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-00000003"]
    after = model_tensors(run.load().model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_full_disk_while_a_run_is_rebuilt_names_the_run(tmp_path, monkeypatch):
    """A run written through ``rewrite`` (an import) is built in a temporary folder beside
    it; a full disk there is one line naming the run the user asked for, not that folder,
    and nothing is left behind."""
    import errno
    import os

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("moorelm.run.save_file", full)
    target = tmp_path / "imported"
    cfg = ModelConfig(vocab_size=TOK.vocab_size, seq_len=16, n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(MoorelmError) as e:
        with RunFolder(target).rewrite() as run:
            run.write_files({"model": cfg.to_dict()}, TOK)
            run.save(0, LMCodec().checkpoint_files(GPT(cfg)), {"tokens": 0, "elapsed": 0.0})
    assert str(e.value).startswith(f"cannot save the checkpoint {target}/checkpoints/step-")
    assert ".tmp" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_safetensors_write_errors_are_one_line(tmp_path, monkeypatch):
    """safetensors reports a failed write as its own error type; a full disk reported that way
    reads as a full disk, anything else gives its first line."""
    from safetensors import SafetensorError

    run = _run(tmp_path / "r", step=3)
    files = LMCodec().checkpoint_files(GPT(run.model_config()))
    for text, needle in [
        ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
         'space left on device" })', "no space left on the device"),
        ("Error while serializing: something odd\nmore", "something odd"),
    ]:
        def fail(*args, text=text, **kwargs):
            raise SafetensorError(text)

        monkeypatch.setattr("moorelm.run.save_file", fail)
        with pytest.raises(MoorelmError, match=needle) as e:
            run.save(4, files, {"tokens": 0, "elapsed": 0.0})
        assert "\n" not in str(e.value)
    assert [p.name for p in run.checkpoints()] == ["step-00000003"]


def test_resume_checks_the_config_against_the_weights_before_building(tmp_path):
    """Resuming a run whose config.json asks for a million layers is refused from the
    checkpoint's header by RunFolder.check_new, before the training loop builds a model; a
    consistent run passes."""
    run = _run(tmp_path / "r")
    run.check_new(resume=True)
    _edit_config(run, **{"model.n_layer": 1_000_000})
    with pytest.raises(MoorelmError, match="n_layer=1000000"):
        run.check_new(resume=True)


def test_state_and_config_are_read_safely(tmp_path):
    """config.json or state.json that is deep, holds a 5000-digit number or is a folder is one
    line naming the file."""
    for name, content in [("deep", "[" * 100_000), ("digits", '{"n": ' + "9" * 5000 + "}"),
                          ("dir", None)]:
        run = _run(tmp_path / name)
        for path in (run.config_path, run.latest() / "state.json"):
            original = path.read_bytes()
            path.unlink()
            if content is None:
                path.mkdir()
            else:
                path.write_text(content)
            with pytest.raises(MoorelmError, match=re.escape(str(path))) as e:
                moorelm.load(run.path, device="cpu")
            assert "\n" not in str(e.value)
            path.rmdir() if content is None else path.unlink()
            path.write_bytes(original)


def test_train_force_replaces_a_run_and_nothing_else(tmp_path, small_corpus, capsys):
    """`train --force` over a trained run starts it afresh (the old checkpoints are gone, a
    file of the user's beside them stays); over a folder that is not a run, or together with
    --resume, it is one line and exit 2, and nothing is touched."""
    args = ["train", "--quiet", "--corpus", str(small_corpus), "--batch-size", "2",
            "--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--seq-len", "16"]
    run = tmp_path / "run"
    assert main([*args, "--max-steps", "3", "--out", str(run)]) == 0
    (run / "notes.txt").write_text("mine")
    assert main([*args, "--max-steps", "2", "--out", str(run)]) == 2  # no --force: refused
    assert [p.name for p in RunFolder(run).checkpoints()] == ["step-00000003"]
    assert main([*args, "--max-steps", "2", "--out", str(run), "--force"]) == 0
    assert [p.name for p in RunFolder(run).checkpoints()] == ["step-00000002"]
    assert (run / "notes.txt").read_text() == "mine"
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    capsys.readouterr()
    for extra in (["--out", str(user), "--force"], ["--out", str(run), "--force", "--resume"]):
        assert main([*args, "--max-steps", "2", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moorelm: error:") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in user.iterdir()) == ["thesis.txt"]
    assert [p.name for p in RunFolder(run).checkpoints()] == ["step-00000002"]
