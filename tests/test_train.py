import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bloodcell.evaluate import evaluate
from bloodcell.models import load_model
from bloodcell.train import TrainConfig, lr_at, train


def _cfg(data, out, **kw):
    base = dict(model="cnn3", data=str(data), out=str(out), image_size=32, epochs=3, batch_size=16,
                lr=3e-3, patience=0, progress=False, pretrained=False)
    base.update(kw)
    return TrainConfig(**base)


def test_train_learns_synthetic_and_writes_run(synthetic_dataset, tmp_path):
    run = tmp_path / "run"
    s = train(_cfg(synthetic_dataset, run, model="cnn", epochs=6))
    assert s["finished"] and s["epochs_run"] == 6
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 6 and {"train_loss", "val_accuracy", "images_per_s", "seconds", "machine"} <= set(hist[0])
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert (run / "history.csv").read_text().count("\n") == 7
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"][0] == "basophil" and meta["split_manifest_sha1"]
    assert meta["train_args"]["seed"] == 42 and "torch" in meta["library_versions"]
    assert (run / "split.csv").exists()
    ev = evaluate(run, synthetic_dataset, split="val", out=tmp_path / "ev", progress=False)
    assert ev.metrics["accuracy"] > 0.3  # chance is 0.125
    keys = json.loads((tmp_path / "ev" / "metrics.json").read_text()).keys()
    assert set(keys) == {"accuracy", "macro_f1", "n_images", "classes", "per_class",
                         "confusion_matrix", "skipped"}
    # evaluating through ONNX Runtime (what `bloodcell predict` runs) gives the same answers
    eo = evaluate(run, synthetic_dataset, split="val", progress=False, backend="onnx")
    assert eo.metrics["backend"] == "onnx" and np.abs(eo.probs - ev.probs).max() < 1e-4
    assert eo.paths == ev.paths and len(ev.y) == ev.metrics["n_images"] == len(ev.probs)


def test_same_seed_same_result(synthetic_dataset, tmp_path):
    a = train(_cfg(synthetic_dataset, tmp_path / "a", epochs=2))
    b = train(_cfg(synthetic_dataset, tmp_path / "b", epochs=2))
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_early_stopping_restores_best(synthetic_dataset, tmp_path):
    run = tmp_path / "es"
    s = train(_cfg(synthetic_dataset, run, epochs=30, patience=1, lr=0.0))  # lr 0: never improves
    assert s["epochs_run"] == 2 and s["best"]["epoch"] == 1


def _val_log_loss(run, data) -> float:
    ev = evaluate(run, data, split="val", progress=False)
    return float(-np.log(np.clip(ev.probs[np.arange(len(ev.y)), ev.y], 1e-12, None)).mean())


def test_early_stopping_keeps_the_best_epochs_weights(synthetic_dataset, tmp_path):
    """With a learning rate that changes the model every epoch, the saved model is the
    best epoch's, not the last one's: its validation loss is the one logged for the best
    epoch. Fails if the weights are saved after every epoch instead of only the best."""
    from safetensors.torch import load_file
    run = tmp_path / "es"
    s = train(_cfg(synthetic_dataset, run, epochs=6, patience=1, lr=0.03, precision="fp32"))
    best, last = s["history"][s["best"]["epoch"] - 1], s["history"][-1]
    assert s["best"]["epoch"] < s["epochs_run"], "precondition: training stopped after a worse epoch"
    assert abs(best["val_loss"] - last["val_loss"]) > 0.01, "precondition: the epochs differ"
    assert _val_log_loss(run, synthetic_dataset) == pytest.approx(best["val_loss"], abs=1e-3)
    saved = load_file(str(run / "model.safetensors"))
    last_state = load_file(str(run / "checkpoint" / "last.safetensors"))  # the last epoch's
    assert any(not np.allclose(v.numpy(), last_state[f"model.{k}"].numpy()) for k, v in saved.items())


def test_saved_batchnorm_statistics_are_those_of_the_training_images(synthetic_dataset, tmp_path):
    """Precise BN: after training, every BatchNorm layer's running mean/variance are the
    statistics of its inputs over the (un-augmented) training images, not a running
    average lagging behind the weights. Fails if the re-estimation after each epoch is
    turned off."""
    import torch

    from bloodcell import data as D
    run = tmp_path / "bn"
    # fp32: on a CPU with native bf16 the training would compute the statistics in bf16
    train(_cfg(synthetic_dataset, run, model="lite0-recipe", epochs=1, max_steps_per_epoch=2,
               lr=1e-3, precision="fp32"))
    model, meta = load_model(run)
    ds = D.scan(synthetic_dataset)
    images, _ = D.load_images(ds, meta.image_size, progress=False)
    splits = D.apply_manifest(ds, D.read_manifest(run / "split.csv"))
    x = np.asarray(images[D.split_indices(splits, "train")])
    assert len(x) <= 64, "one batch of training images, so the statistics are exact"
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 40
    saved = {m: (m.running_mean.clone(), m.running_var.clone()) for m in bns}
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.__setitem__(m, a[0].detach())) for m in bns]
    for m in bns:
        m.train()  # normalise with the batch's statistics, as the re-estimation does
    from bloodcell.transforms import to_tensor
    with torch.no_grad():
        model(to_tensor(x))
    for h in hooks:
        h.remove()
    for m in bns:
        inp = seen[m].transpose(0, 1).flatten(1)  # channels x values
        mean, var = saved[m]
        assert torch.allclose(mean, inp.mean(1), rtol=1e-3, atol=1e-4), m
        assert torch.allclose(var, inp.var(1, unbiased=True), rtol=1e-3, atol=1e-4), m


def test_resume_continues_from_last_epoch(synthetic_dataset, tmp_path):
    full = train(_cfg(synthetic_dataset, tmp_path / "full", epochs=3))
    part = tmp_path / "part"
    train(_cfg(synthetic_dataset, part, epochs=3, max_steps_per_epoch=None).__class__(
        **{**_cfg(synthetic_dataset, part, epochs=3).__dict__, "epochs": 2}))
    # continue the 2-epoch run up to 3 epochs: identical to the uninterrupted run
    s = train(_cfg(synthetic_dataset, part, epochs=3, resume=True))
    assert [h["epoch"] for h in s["history"]] == [1, 2, 3]
    assert s["history"][-1]["train_loss"] == pytest.approx(full["history"][-1]["train_loss"], rel=1e-4)


def test_resume_after_kill(synthetic_dataset, tmp_path):
    """SIGKILL mid-training, then --resume finishes from the last checkpoint."""
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "bloodcell.cli", "train", "--model", "cnn3", "--data",
           str(synthetic_dataset), "--out", str(run), "--epochs", "40", "--image-size", "32",
           "--batch-size", "8", "--patience", "0", "--no-progress", "--no-pretrained"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint" / "last.json").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads((run / "checkpoint" / "last.json").read_text())["epoch"]
    assert 1 <= done < 40
    r = subprocess.run(cmd[:cmd.index("40")] + ["%d" % (done + 2)] + cmd[cmd.index("40") + 1:]
                       + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == list(range(1, done + 3))


def test_onecycle_schedule_shape():
    lrs = [lr_at(s, 100, 1.0, "onecycle") for s in range(100)]
    assert lrs[0] < 0.1 and max(lrs) == pytest.approx(1.0, abs=0.01) and lrs[-1] < 0.01
    assert lr_at(50, 100, 0.3, "constant") == 0.3
    with pytest.raises(ValueError):
        lr_at(0, 10, 1.0, "bogus")


def test_checkpoint_is_not_pickle(synthetic_dataset, tmp_path):
    run = tmp_path / "r"
    train(_cfg(synthetic_dataset, run, epochs=1))
    for f in run.rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f  # pickle protocol header
            assert f.suffix in {".safetensors", ".json", ".jsonl", ".csv"}, f
    m, meta = load_model(run)
    assert not m.training


def test_ema_weights_are_validated_saved_and_resumed(synthetic_dataset, tmp_path):
    from safetensors.torch import load_file
    run = tmp_path / "ema"
    s = train(_cfg(synthetic_dataset, run, epochs=1, ema=0.9))
    assert "val_accuracy_raw" in s["history"][0]
    saved = load_file(str(run / "model.safetensors"))
    ck = load_file(str(run / "checkpoint" / "last.safetensors"))
    name = next(k for k in saved if k.endswith("weight") and saved[k].ndim == 4)
    # the file holds the averaged weights, not the last step's
    assert np.allclose(saved[name].float().numpy(), ck[f"ema.module.{name}"].float().numpy(), atol=1e-3)
    assert not np.allclose(saved[name].float().numpy(), ck[f"model.{name}"].float().numpy(), atol=1e-3)
    assert json.loads((run / "model.json").read_text())["train_args"]["ema"] == 0.9
    # resuming carries the average on: 2 + 1 epochs == 3 epochs
    full = train(_cfg(synthetic_dataset, tmp_path / "full", epochs=3, ema=0.9))
    part = tmp_path / "part"
    train(_cfg(synthetic_dataset, part, epochs=2, ema=0.9))
    r = train(_cfg(synthetic_dataset, part, epochs=3, ema=0.9, resume=True))
    assert r["history"][-1]["val_loss"] == pytest.approx(full["history"][-1]["val_loss"], rel=1e-4)


def test_subclass_labels_from_file_name_prefixes(tmp_path):
    from PIL import Image

    from bloodcell.data import scan, subclass_labels
    img = np.full((16, 16, 3), 200, np.uint8)
    names = {"neutrophil": ["BNE_1", "BNE_2", "SNE_3", "SNE_4", "SNE_5", "NEUTROPHIL_6"],
             "ig": ["MMY_1", "MMY_2", "MY_3", "MY_4"]}
    for cls, stems in names.items():
        (tmp_path / cls).mkdir()
        for s in stems:
            Image.fromarray(img).save(tmp_path / cls / f"{s}.png")
    ds = scan(tmp_path)
    groups, y = subclass_labels(ds, min_count=2)
    # the single NEUTROPHIL_ file is too rare for a group of its own
    assert groups == ["ig/MMY", "ig/MY", "neutrophil/*", "neutrophil/BNE", "neutrophil/SNE"]
    got = {smp.path.split("/")[-1]: groups[g] for smp, g in zip(ds.samples, y)}
    assert got["BNE_2.png"] == "neutrophil/BNE" and got["NEUTROPHIL_6.png"] == "neutrophil/*"
    assert got["MY_3.png"] == "ig/MY"


def test_subclass_aux_head_trains_but_is_not_saved(synthetic_dataset, tmp_path):
    from safetensors.torch import load_file
    plain = train(_cfg(synthetic_dataset, tmp_path / "plain", model="lite0-recipe", epochs=1,
                       max_steps_per_epoch=2))
    run = tmp_path / "aux"
    s = train(_cfg(synthetic_dataset, run, model="lite0-recipe", epochs=1, max_steps_per_epoch=2,
                   subclass_aux=0.5))
    assert s["finished"]
    # the auxiliary head changes the training (the loss has an extra term) ...
    assert s["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    # ... but the saved model is the plain 8-class network
    assert load_file(str(run / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "plain" / "model.safetensors")).keys()
    assert "aux.weight" in load_file(str(run / "checkpoint" / "last.safetensors"))
    meta = json.loads((run / "model.json").read_text())
    # 12 synthetic images per class: too few for file-name groups, one group per class
    assert meta["auxiliary_subclasses"] == [f"{c}/*" for c in sorted(meta["classes"])]


def test_precision_probe_picks_a_precision_and_leaves_the_model_untouched():
    import torch

    from bloodcell.train import probe_precision
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(4, 3, 16, 16) * 255, torch.tensor([0, 1, 2, 0])
    rng = torch.get_rng_state()
    choice = probe_precision(model, x, y, torch.device("cpu"), key="tiny")
    assert choice in ("fp32", "bf16")
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is untouched
    after = model.state_dict()

    class Boom(torch.nn.Module):  # a rerun must reuse the cached choice, not time again
        def forward(self, x):
            raise AssertionError("timed twice")
    assert probe_precision(Boom(), x, y, torch.device("cpu"), key="tiny") == choice
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats, weights unchanged
    assert all(p.grad is None for p in model.parameters())


def test_mix_changes_the_training_is_recorded_and_refuses_unmixed_targets(synthetic_dataset, tmp_path):
    plain = train(_cfg(synthetic_dataset, tmp_path / "plain", epochs=1))
    run = tmp_path / "cutmix"
    s = train(_cfg(synthetic_dataset, run, epochs=1, mix="cutmix", mix_prob=1.0))
    assert s["finished"] and s["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
    args = json.loads((run / "model.json").read_text())["train_args"]
    assert args["mix"] == "cutmix" and args["mix_prob"] == 1.0
    with pytest.raises(ValueError, match="does not combine with --distill or --subclass-aux"):
        train(_cfg(synthetic_dataset, tmp_path / "x", epochs=1, mix="mixup", subclass_aux=0.5))
    with pytest.raises(ValueError, match="--mix-prob 2"):
        train(_cfg(synthetic_dataset, tmp_path / "y", epochs=1, mix="mixup", mix_prob=2.0))


def test_resume_refuses_other_hyper_parameters_and_cli_refuses_to_overwrite(synthetic_dataset, tmp_path, capsys):
    from bloodcell.cli import main
    run = tmp_path / "run"
    train(_cfg(synthetic_dataset, run, epochs=1))
    for change in ({"lr": 1e-3}, {"batch_size": 8}, {"model": "cnn"}, {"image_size": 48}):
        with pytest.raises(ValueError, match=f"started with {next(iter(change))} "):
            train(_cfg(synthetic_dataset, run, epochs=2, resume=True, **change))
    assert train(_cfg(synthetic_dataset, run, epochs=2, resume=True))["epochs_run"] == 2  # extended
    args = ["train", "--model", "cnn3", "--data", str(synthetic_dataset), "--out", str(run), "--epochs", "1",
            "--image-size", "32", "--no-progress", "--no-pretrained"]
    before = (run / "model.safetensors").read_bytes()
    assert main(args) == 2 and "already holds a run" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before
    for bad, why in ((["--batch-size", "0"], "--batch-size: 0 is out of range"),
                     (["--epochs", "0"], "--epochs: 0 is out of range"),
                     (["--label-smoothing", "2"], "must be 0 to 0.99")):
        with pytest.raises(SystemExit):
            main([*args, "--overwrite", *bad])
        assert why in capsys.readouterr().err
    with pytest.raises(ValueError, match="--image-size 0 is out of range"):  # the Python API too
        train(_cfg(synthetic_dataset, tmp_path / "api", image_size=0))
    assert not (tmp_path / "api").exists()


def test_an_interrupted_train_command_exits_non_zero(synthetic_dataset, tmp_path, monkeypatch, capsys):
    """Ctrl-C stops training at a checkpoint and train() returns unfinished: the command
    says so and exits 3, so `train && calibrate` does not go on with a half-trained run."""
    import bloodcell.train as T
    from bloodcell.cli import main
    monkeypatch.setattr(T, "train", lambda cfg, tracker=None: {"finished": False, "history": [{"epoch": 1}],
                                                               "best": {}, "run": cfg.out})
    assert main(["train", "--model", "cnn3", "--data", str(synthetic_dataset), "--out", str(tmp_path / "r"),
                 "--epochs", "4", "--no-progress"]) == 3
    assert "interrupted after epoch 1 of 4" in capsys.readouterr().err
