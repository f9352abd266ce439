"""The training and evaluation pipeline end to end, on a tiny model and a small slice of the
bundled NaCl cluster set.

* a short training run whose loss falls by a stated factor (metrics.jsonl), with the run
  directory's records (config, versions, dataset fingerprints, checkpoints);
* checkpoint save/resume: N steps uninterrupted == N/2 steps, then resumed to N (bitwise
  equal parameters, EMA and optimizer state, latest and best);
* run directories are never reused with a different config or overwritten silently;
* one data-parallel train step on a 4-device CPU mesh == the same step on one device (float64);
* ``python -m experiments.evaluate`` writes the summary, predictions and parity plot, matching
  in-process ``load_model(run).predict``, and refuses to overwrite.

One training run is shared by the whole module (``trained_run``); the resume test adds two
more short runs. The subprocess checks (4-device step, evaluate CLI) start in the background as
soon as their inputs exist, overlapping the in-process runs. About 2 minutes of CPU in all;
``-m slow`` adds a SIGINT-interrupt/resume test (~1 minute).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # configs/ is a top-level directory of the repository, not installed
    sys.path.insert(0, str(REPO))

import configs.nacl  # noqa: E402
from polarjax.data.bundled import bundled_path  # noqa: E402
from polarjax.training import loop  # noqa: E402
from polarjax.training.checkpoint import Checkpoints  # noqa: E402
from polarjax.training.dataset import file_fingerprint, read_frames  # noqa: E402

NUM_STEPS = 30          # the shared run; the resume test stops at NUM_STEPS // 2
LOSS_DROP_FACTOR = 5.0  # mean loss of the first 3 steps / mean loss of the last 5 steps (observed: ~19)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


class Job:
    """A subprocess started early so that it overlaps the in-process training (output to files)."""

    def __init__(self, command, **kwargs):
        self.command = command
        self._out, self._err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, stdout=self._out, stderr=self._err, text=True, **kwargs)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._out.seek(0), self._err.seek(0)
        return subprocess.CompletedProcess(self.command, self.process.returncode, self._out.read(), self._err.read())

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _selected(request, prefix: str) -> bool:
    return any(item.name.startswith(prefix) for item in request.session.items)


@pytest.fixture(scope="module", autouse=True)
def background_jobs(request, tmp_path_factory):
    """Subprocess checks, started as soon as their inputs exist (only for selected tests)."""
    jobs = {}
    if _selected(request, "test_sharded_step") or _selected(request, "test_checkpoint_of_other"):
        jobs["sharded"] = start_sharded_job(tmp_path_factory.mktemp("sharded"))
    yield jobs
    for job, _ in jobs.values():
        job.kill()


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """24 Na9Cl8+ clusters of the bundled set whose batches all pad to the same shape, so each
    training run compiles its step once (keeps the module fast)."""
    from polarjax.models import spec_from_config
    from polarjax.training.batches import BatchBuilder

    source = bundled_path("nacl_clusters.xyz")
    frames, _ = read_frames(source, index=":120")
    builder = BatchBuilder(spec_from_config(dict(species=[11, 17], encoder_kwargs=dict(cutoff=5.29))), 5.29)
    chosen = [i for i, f in enumerate(frames) if f.num_atoms == 17 and builder.prepared(f).num_edges <= 96][:24]
    assert len(chosen) == 24
    images = ase.io.read(source, index=":120")
    path = tmp_path_factory.mktemp("data") / "nacl_small.xyz"
    ase.io.write(path, [images[i] for i in chosen], format="extxyz")
    return path


def tiny_config(data_file: Path, num_steps: int = NUM_STEPS):
    """configs/nacl.py with a tiny model and a short, deterministic schedule.

    The learning rate is constant after a 5-step warmup and there is no final loss stage, so
    that neither depends on ``num_steps``: a run extended from N/2 to N steps is then the same
    computation as an N-step run (the cosine schedule and the final stage are defined relative
    to ``num_steps``).
    """
    c = configs.nacl.get_config()
    c.data.train_file = str(data_file)
    c.data.valid_fraction = 4 / 24
    c.data.test_fraction = 4 / 24
    c.data.max_train_frames = 16
    c.model.encoder_kwargs.num_channels = 4
    c.model.encoder_kwargs.num_layers = 1
    c.model.encoder_kwargs.l_max = 1
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 5
    c.loss.final_fraction = 0.0
    c.train.num_steps = num_steps
    c.train.time_budget_minutes = 0.0
    c.train.batch_size = 2
    c.train.eval_batch_size = 4
    c.train.eval_every = NUM_STEPS // 2
    c.train.checkpoint_every = NUM_STEPS // 2
    c.train.log_every = 1
    c.train.tensorboard = False
    c.train.num_devices = 1
    return c


@pytest.fixture(scope="module")
def trained_run(small_dataset, tmp_path_factory, background_jobs, request):
    run_dir = tmp_path_factory.mktemp("runs") / "nacl_tiny"
    config = tiny_config(small_dataset)
    summary = loop.train(config, run_dir)
    if _selected(request, "test_evaluate_cli"):
        background_jobs["evaluate"] = start_evaluate_job(run_dir, tmp_path_factory.mktemp("evaluate"))
    return run_dir, config, summary


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def read_checkpoint(run_dir: Path, which: str):
    """(step, state pytree, meta) of the latest or best checkpoint, restored without a template."""
    import orbax.checkpoint as ocp

    checkpoints = Checkpoints(run_dir)
    manager = checkpoints.best if which == "best" else checkpoints.latest
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    checkpoints.close()
    return step, restored["state"], restored["meta"]


def assert_trees_bitwise_equal(a, b, what: str):
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b], what
    assert len(leaves_a) > 10, what
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, jax.tree_util.keystr(path))
        assert np.array_equal(x, y), f"{what}{jax.tree_util.keystr(path)} differs: max |Δ| {np.max(np.abs(x - y))}"


# ----------------------------------------------------------------------------- training


def test_training_loss_decreases(trained_run):
    run_dir, _, summary = trained_run
    train = metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, NUM_STEPS + 1))
    losses = np.array([r["loss"] for r in train])
    assert np.all(np.isfinite(losses))
    first, last = losses[:3].mean(), losses[-5:].mean()
    assert first / last > LOSS_DROP_FACTOR, f"loss fell only from {first:.4g} to {last:.4g} (×{first / last:.2f})"
    # equal-shape batches: the training step compiled once (the count is in the log)
    assert train[0]["compiles"] == 1 and all(r["compiles"] <= 2 for r in train)
    valid = metrics(run_dir, "valid")
    assert [r["step"] for r in valid] == [NUM_STEPS // 2, NUM_STEPS]
    for record in valid:
        assert record["n_frames"] == 4
        assert 0 < record["energy_rmse_meV_per_atom"] < 1e3 and 0 < record["forces_rmse_meV_per_A"] < 1e4
    assert summary["stop_reason"] == "num_steps" and summary["steps"] == NUM_STEPS
    assert summary["split_sizes"] == {"train": 16, "valid": 4, "test": 4}
    assert summary["best_step"] in (NUM_STEPS // 2, NUM_STEPS)
    for split in ("valid", "test"):
        assert set(summary[split]) >= {"n_frames", "n_atoms", "energy_rmse_meV_per_atom", "energy_mae_meV_per_atom",
                                       "forces_rmse_meV_per_A", "forces_mae_meV_per_A"}


def test_run_directory_records(trained_run, small_dataset):
    run_dir, config, summary = trained_run
    assert json.loads((run_dir / "config.json").read_text()) == json.loads(json.dumps(config.to_dict()))
    info = json.loads((run_dir / "run_info.json").read_text())
    import polarjax

    assert info["polarjax_version"] == polarjax.__version__ and info["jax_version"] == jax.__version__
    assert info["datasets"]["train_file"]["sha256"] == file_fingerprint(small_dataset)
    assert info["datasets"]["train_file"]["frames"] == 24 and info["datasets"]["train_file"]["skipped"] == []
    assert info["model"]["species"] == [11, 17] and len(info["model"]["atomic_energies"]) == 2
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == NUM_STEPS
    latest = sorted(int(p.name) for p in (run_dir / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert latest == [NUM_STEPS // 2, NUM_STEPS]
    step, state, meta = read_checkpoint(run_dir, "best")
    assert step == summary["best_step"] == meta["best_step"] and int(np.asarray(state["step"])) == step


def test_load_model_uses_best_ema_parameters(trained_run):
    from polarjax import load_model

    run_dir, _, _ = trained_run
    loaded = load_model(run_dir)
    _, state, _ = read_checkpoint(run_dir, "best")
    assert_trees_bitwise_equal(loaded.params, state["ema_params"], "best EMA")
    # the EMA really is an average, not a copy of the raw parameters
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(state["ema_params"]),
                                                        jax.tree_util.tree_leaves(state["params"])))


def test_training_orients_the_latent_sign(trained_run, small_dataset):
    """The run records the sign convention (Cl negative by default) and load_model applies it."""
    from polarjax import load_model
    from polarjax.training.dataset import read_frames

    run_dir, _, summary = trained_run
    stored = json.loads((run_dir / "orientation.json").read_text())
    assert stored["reference"] == "Cl=-1" and summary["orientation"] == stored
    loaded = load_model(run_dir)
    assert loaded.spec.latent_sign == stored["latent_sign"]
    frames = read_frames(small_dataset, {}, require=())[0][:8]
    charges = [q for f, item in zip(frames, loaded.predict(frames)) for q, z in zip(item["charges"], f.numbers) if z == 17]
    assert np.mean(charges) < 0


def test_resume_after_extending_num_steps_is_bitwise_exact(trained_run, small_dataset, tmp_path, capsys):
    """N/2 steps, then the same config with num_steps = N in the same run directory, gives
    exactly the parameters, EMA, optimizer state, data position and best checkpoint of the
    uninterrupted N-step run."""
    reference_dir, _, reference_summary = trained_run
    run_dir = tmp_path / "resumed"
    half = loop.train(tiny_config(small_dataset, NUM_STEPS // 2), run_dir)
    assert half["steps"] == NUM_STEPS // 2
    capsys.readouterr()
    full = loop.train(tiny_config(small_dataset, NUM_STEPS), run_dir)
    assert f"resumed from {run_dir.resolve()} at step {NUM_STEPS // 2}" in capsys.readouterr().out
    assert full["steps"] == NUM_STEPS and full["best_step"] == reference_summary["best_step"]

    for which in ("latest", "best"):
        step_ref, ref, meta_ref = read_checkpoint(reference_dir, which)
        step, got, meta = read_checkpoint(run_dir, which)
        assert step == step_ref
        assert meta["best_metric"] == meta_ref["best_metric"] and meta["best_step"] == meta_ref["best_step"]
        for key in ("params", "ema_params", "opt_state"):
            assert_trees_bitwise_equal(got[key], ref[key], f"{which}.{key}")
        for key in ("step", "epoch", "batch_in_epoch", "rng"):
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(ref[key]), err_msg=f"{which}.{key}")

    # the resumed run continued the data order and logged each step once, with the same losses
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, NUM_STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in metrics(reference_dir)]
    assert full["test"] == reference_summary["test"]


@pytest.mark.slow
def test_sigint_then_resume_is_bitwise_exact(trained_run, small_dataset, tmp_path, monkeypatch):
    """A run interrupted with SIGINT stops cleanly after the current step with a checkpoint;
    re-running the identical command finishes exactly like the uninterrupted run."""
    reference_dir, config, _ = trained_run
    stop_before = NUM_STEPS // 2 - 3  # not a checkpoint_every multiple: the interrupt itself must save
    real_weights = loop.weights_at_step

    def weights_and_interrupt(stages, step):
        if step == stop_before - 1:
            signal.raise_signal(signal.SIGINT)
        return real_weights(stages, step)

    monkeypatch.setattr(loop, "weights_at_step", weights_and_interrupt)
    run_dir = tmp_path / "interrupted"
    summary = loop.train(tiny_config(small_dataset), run_dir)
    assert summary["stop_reason"] == "interrupted" and summary["steps"] == stop_before
    assert read_checkpoint(run_dir, "latest")[0] == stop_before
    monkeypatch.setattr(loop, "weights_at_step", real_weights)
    summary = loop.train(tiny_config(small_dataset), run_dir)
    assert summary["stop_reason"] == "num_steps"
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, NUM_STEPS + 1))  # resumed, not restarted
    for which in ("latest", "best"):
        _, ref, _ = read_checkpoint(reference_dir, which)
        _, got, _ = read_checkpoint(run_dir, which)
        for key in ("params", "ema_params", "opt_state"):
            assert_trees_bitwise_equal(got[key], ref[key], f"{which}.{key}")


# ----------------------------------------------------------------------------- run directories


def test_run_directory_refuses_a_different_config(trained_run, small_dataset, tmp_path):
    run_dir, _, _ = trained_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    different = tiny_config(small_dataset)
    different.train.seed = 1
    with pytest.raises(loop.RunDirectoryError, match=r"different config.*train\.seed"):
        loop.train(different, run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    stranger = tmp_path / "not_a_run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(loop.RunDirectoryError, match="not a polarjax run directory"):
        loop.train(tiny_config(small_dataset), stranger)
    assert (stranger / "notes.txt").read_text() == "mine"


def test_overwrite_moves_aside_never_deletes(tmp_path):
    """Repeated --overwrite (even within one second) keeps every earlier directory, unnested."""
    run_dir = tmp_path / "run"
    contents = []
    for k in range(3):
        path, resuming = loop.prepare_run_dir(run_dir, {"seed": k}, overwrite=True)
        assert path == run_dir.resolve() and not resuming and not any(path.iterdir())
        (path / "config.json").write_text(json.dumps({"seed": k}))
        (path / "weights.bin").write_bytes(bytes([k]) * 16)
        contents.append(k)
    backups = sorted(p for p in tmp_path.iterdir() if p.name.startswith("run.old-"))
    assert len(backups) == 2
    assert sorted(json.loads((b / "config.json").read_text())["seed"] for b in backups) == [0, 1]
    for b in backups:
        assert sorted(p.name for p in b.iterdir()) == ["config.json", "weights.bin"]  # nothing nested


def test_train_cli_refuses_then_overwrite_moves_aside(trained_run, tmp_path):
    """The CLI: a different config is refused; --overwrite moves the old run aside intact."""
    source, _, _ = trained_run
    run_dir = tmp_path / "cli_run"
    shutil.copytree(source, run_dir)
    files = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    command = [sys.executable, "-m", "experiments.train", "--config", str(REPO / "configs" / "nacl.py"),
               "--workdir", str(run_dir)]
    refused = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "RunDirectoryError" in refused.stderr and "--overwrite" in refused.stderr
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files

    # --overwrite, with a missing data file so that the new run stops right after moving the old one
    missing = tmp_path / "missing.xyz"
    moved = subprocess.run(command + ["--overwrite", f"--config.data.train_file={missing}"], cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert moved.returncode != 0 and "file not found" in moved.stderr
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("cli_run.old-")]
    assert len(backups) == 1
    assert {p.relative_to(backups[0]): p.read_bytes() for p in backups[0].rglob("*") if p.is_file()} == files
    assert not (run_dir / "config.json").exists()


# ----------------------------------------------------------------------------- data parallel

SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from polarjax.data.bundled import bundled_path
    from polarjax.models import build, spec_from_config
    from polarjax.training.batches import BatchBuilder
    from polarjax.training.dataset import fit_atomic_energies, read_frames
    from polarjax.training.optim import build_optimizer
    from polarjax.training.state import TrainState, data_mesh, make_train_step

    assert jax.device_count() == 4 and jax.config.jax_enable_x64
    frames, _ = read_frames(bundled_path("nacl_clusters.xyz"), index=":4")  # 17, 17, 17 and 16 atoms
    assert sorted({f.num_atoms for f in frames}) == [16, 17]
    spec = spec_from_config(dict(species=[11, 17], encoder="nequip", variant="les",
                                 atomic_energies=list(fit_atomic_energies(frames, [11, 17])),
                                 encoder_kwargs=dict(cutoff=5.29, num_channels=4, num_layers=1, l_max=1,
                                                     avg_num_neighbors=8.0)))
    model = build(spec)
    builder = BatchBuilder(spec, 5.29, dtype=np.float64)
    optimizer = build_optimizer(dict(name="adam", lr=1e-2, schedule="constant", clip_norm=10.0), 10)
    example, _ = builder.build(frames[:1])
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64),
                                    model.init(jax.random.PRNGKey(0), example))

    def fresh_state():  # the step donates its state
        p = jax.tree_util.tree_map(np.copy, params)
        return TrainState(p, optimizer.init(p), jax.tree_util.tree_map(np.copy, p), np.asarray(0),
                          np.zeros(2, np.uint32), np.asarray(0), np.asarray(0))

    weights = np.array([100.0, 10.0, 0.0])
    out = {}
    for name, shards, mesh in (("mesh4", 4, data_mesh(4)), ("stacked4", 4, None), ("union1", 1, None)):
        graphs, labels = builder.build_sharded(frames, shards)
        assert graphs.positions.shape[0] == shards
        step = make_train_step(model, optimizer, "open", None, False, 0.99, mesh)
        state, m = step(fresh_state(), graphs, labels, weights)
        if mesh is not None:  # really spread over the 4 devices
            assert len(jax.tree_util.tree_leaves(state.params)[0].sharding.device_set) == 4
        if mesh is not None:  # a checkpoint of mesh-sharded arrays, loaded later by a 1-device process
            from polarjax.training.checkpoint import Checkpoints
            run = sys.argv[2]
            checkpoints = Checkpoints(run)
            checkpoints.save_best(1, state, {"step": 1})
            checkpoints.close()
            model_dict = dict(species=[11, 17], encoder="nequip", variant="les",
                              atomic_energies=list(spec.atomic_energies),
                              encoder_kwargs=dict(spec.encoder_kwargs))
            json.dump({"model": model_dict}, open(run + "/run_info.json", "w"))
            json.dump({"model": {"encoder_kwargs": {"cutoff": 5.29}}, "train": {"float64": True}},
                      open(run + "/config.json", "w"))
            out["ema_params"] = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state.ema_params)]
        out[name] = dict(metrics={k: float(v) for k, v in m.items()},
                         params=[np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(state.params)],
                         dtypes=sorted({str(np.asarray(x).dtype) for x in jax.tree_util.tree_leaves(state.params)}))
    json.dump(out, open(sys.argv[1], "w"))
""")


def start_sharded_job(root: Path):
    script = root / "sharded.py"
    script.write_text(SHARDED_SCRIPT)
    result_path = root / "sharded.json"
    (root / "run").mkdir()
    job = Job([sys.executable, str(script), str(result_path), str(root / "run")], cwd=REPO,
              env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_ENABLE_X64="1"))
    return job, result_path


def test_checkpoint_of_other_devices_loads_here(background_jobs):
    """A checkpoint written by a 4-device run (arrays sharded over a mesh, like a GPU run)
    loads in this 1-device process: load_model restores onto the local device."""
    from polarjax import load_model

    job, result_path = background_jobs["sharded"]
    run = job.result()
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = load_model(result_path.parent / "run")
    expected = json.loads(result_path.read_text())["ema_params"]
    leaves = jax.tree_util.tree_leaves(loaded.params)
    assert len(leaves) == len(expected)
    for got, want in zip(leaves, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.device_set == {jax.devices()[0]}


def test_sharded_step_matches_single_device(background_jobs):
    """One train step on a 4-device CPU mesh (one frame per device, frames of different sizes)
    has the loss, metrics and updated parameters of the same stacked shards on one device and
    of the union batch (D = 1), in float64 (subprocess: XLA_FLAGS=--xla_force_host_platform_device_count=4)."""
    job, result_path = background_jobs["sharded"]
    run = job.result()
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(result_path.read_text())
    reference = result["union1"]
    assert reference["dtypes"] == ["float64"]
    assert reference["metrics"]["loss"] > 0
    for name in ("mesh4", "stacked4"):
        for key, value in reference["metrics"].items():
            assert result[name]["metrics"][key] == pytest.approx(value, rel=1e-12, abs=1e-15), (name, key)
        for got, want in zip(result[name]["params"], reference["params"]):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=name)


# ----------------------------------------------------------------------------- evaluation CLI


def start_evaluate_job(run_dir: Path, root: Path):
    """``python -m experiments.evaluate`` on 3 clusters (one with 16 atoms) carrying dipole labels."""
    images = ase.io.read(bundled_path("nacl_clusters.xyz"), index="100:103")
    rng = np.random.default_rng(3)
    for atoms in images:
        atoms.info["dipole"] = rng.normal(size=3)
    data = root / "labelled.xyz"
    ase.io.write(data, images, format="extxyz")
    output = root / "out" / "summary.json"
    command = [sys.executable, "-m", "experiments.evaluate", "--run", str(run_dir), "--data", str(data),
               "--output", str(output)]
    return Job(command, cwd=REPO, env=subprocess_env()), dict(run_dir=run_dir, data=data, output=output,
                                                             command=command)


@pytest.fixture(scope="module")
def evaluated(trained_run, background_jobs):
    job, info = background_jobs["evaluate"]
    run = job.result()
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(info, stdout=run.stdout)


def test_evaluate_cli_writes_outputs(evaluated):
    output = evaluated["output"]
    predictions = output.with_name("summary_predictions.xyz")
    parity = output.with_name("summary_parity.png")
    assert output.exists() and predictions.exists() and parity.exists()
    assert parity.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and parity.stat().st_size > 5000
    summary = json.loads(output.read_text())
    for key in ("n_frames", "n_atoms", "energy_rmse_meV_per_atom", "energy_mae_meV_per_atom", "forces_rmse_meV_per_A",
                "forces_mae_meV_per_A", "dipole_rmse_eA"):
        assert key in summary, key
    frames, _ = read_frames(evaluated["data"])
    assert summary["n_frames"] == 3 and summary["n_atoms"] == sum(f.num_atoms for f in frames)
    assert summary["energy_mae_meV_per_atom"] <= summary["energy_rmse_meV_per_atom"]
    assert "E RMSE (meV/atom)" in evaluated["stdout"] and "dipole RMSE (e·Å)" in evaluated["stdout"]


def test_evaluate_cli_matches_in_process_predictions(evaluated):
    from polarjax import load_model

    frames, _ = read_frames(evaluated["data"], require=())
    predictions = load_model(evaluated["run_dir"]).predict(frames)
    written = ase.io.read(evaluated["output"].with_name("summary_predictions.xyz"), index=":")
    assert len(written) == len(frames)
    for frame, pred, atoms in zip(frames, predictions, written):
        np.testing.assert_array_equal(atoms.numbers, frame.numbers)
        assert atoms.get_potential_energy() == pytest.approx(pred["energy"], rel=0, abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), pred["forces"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(atoms.arrays["latent_charges"], pred["charges"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(atoms.arrays["induced_charges"], pred["induced_charges"], rtol=0, atol=1e-6)
        dipole = (pred["charges"] + pred["induced_charges"]) @ frame.positions + (
            pred["dipoles"] + pred["induced_dipoles"]).sum(axis=0)
        np.testing.assert_allclose(atoms.info["pred_dipole"], dipole, rtol=0, atol=1e-5)
        assert atoms.info["ref_energy"] == pytest.approx(frame.labels["energy"], rel=0, abs=1e-6)

    # the summary's errors are those of the in-process predictions
    summary = json.loads(evaluated["output"].read_text())
    e_err = np.array([1e3 * (p["energy"] - f.labels["energy"]) / f.num_atoms for f, p in zip(frames, predictions)])
    f_err = np.concatenate([1e3 * (p["forces"] - f.labels["forces"]).ravel() for f, p in zip(frames, predictions)])
    d_err = np.concatenate([((p["charges"] + p["induced_charges"]) @ f.positions
                             + (p["dipoles"] + p["induced_dipoles"]).sum(0) - f.labels["dipole"]) for f, p in
                            zip(frames, predictions)])
    assert summary["energy_rmse_meV_per_atom"] == pytest.approx(np.sqrt(np.mean(e_err**2)), rel=1e-6)
    assert summary["energy_mae_meV_per_atom"] == pytest.approx(np.mean(np.abs(e_err)), rel=1e-6)
    assert summary["forces_rmse_meV_per_A"] == pytest.approx(np.sqrt(np.mean(f_err**2)), rel=1e-6)
    assert summary["forces_mae_meV_per_A"] == pytest.approx(np.mean(np.abs(f_err)), rel=1e-6)
    assert summary["dipole_rmse_eA"] == pytest.approx(np.sqrt(np.mean(d_err**2)), rel=1e-6)


def test_evaluate_cli_refuses_to_overwrite(evaluated):
    output = evaluated["output"]
    paths = [output, output.with_name("summary_predictions.xyz"), output.with_name("summary_parity.png")]
    before = [p.read_bytes() for p in paths]
    run = subprocess.run(evaluated["command"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "refusing to overwrite" in run.stderr and str(output) in run.stderr
    assert [p.read_bytes() for p in paths] == before


def test_multipole_statistics():
    """R², Pearson r and the slope of pred ≈ s·ref (used for dipoles and quadrupoles)."""
    from polarjax.training.evaluation import _stats

    ref = np.random.default_rng(0).normal(size=(20, 3))
    stats = _stats(-0.5 * ref, ref)
    assert stats["slope"] == pytest.approx(-0.5) and stats["pearson_r"] == pytest.approx(-1.0)
    assert stats["r2"] == pytest.approx(1 - 2.25 * np.sum(ref**2) / np.sum((ref - ref.mean())**2))
    assert _stats(ref, ref)["r2"] == pytest.approx(1.0) and _stats(ref, ref)["rmse"] == 0


@pytest.mark.parametrize("name", ["nacl", "water", "water_alpha", "dipeptides", "hfo2"])
def test_shipped_configs_load_and_define_a_model(name):
    """Every shipped config resolves (including configs built on other configs) to a valid model spec."""
    import importlib

    from polarjax.models import spec_from_config

    config = importlib.import_module(f"configs.{name}").get_config()
    model = {k: v for k, v in config.model.to_dict().items() if v is not None}
    spec = spec_from_config({**model, "species": [1, 8]})
    assert spec.variant == config.model.variant and config.train.num_steps > 0
    assert config.data.train_file
