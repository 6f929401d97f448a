"""`stainbridge bench throughput`: naive loop, batched pipeline and the real service on the same files.

No timed assertions: the machine is shared; what is checked is that every mode ran over every
image and that the JSON carries the documented keys.
"""

import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from PIL import Image

from stainbridge.daemon.cli import main
from stainbridge.models.bench.service_run import batch_steps, log_stages, steady_state, sum_steps
from stainbridge.models.bench.throughput_modes import FRAME, make_images
from stainbridge.models.checkpoint import save_checkpoint
from stainbridge.models.classifier import build_classifier
from stainbridge.models.imaging.synthetic import CLASSES

torch.set_num_threads(1)  # a shared CPU: one math thread per process (as the other model tests do)

KEYS = {"device", "images", "naive", "pipeline", "service", "speedup_vs_naive", "stages", "peak_rss_mb"}


@pytest.mark.slow
def test_all_three_modes_process_every_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One run: naive, pipeline and the real `stainbridge run` each handle all 6 files; JSON has every key."""
    out = tmp_path / "tput.json"
    code = main(["bench", "throughput", "--device", "cpu", "--images", "6", "--batch-size", "4", "--preset", "cpu",
                 "--workdir", str(tmp_path / "work"), "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert KEYS <= set(result)
    assert result["device"] == "cpu" and result["images"] == 6
    for mode in ("naive", "pipeline", "service"):
        assert result[mode]["images"] == 6 and result[mode]["images_per_s"] > 0, mode
    assert result["service"]["failed"] == 0 and result["service"]["exit_code"] == 0
    assert {"time_to_first_result_s", "steady_images_per_s", "images_per_s", "startup_s"} <= set(result["service"])
    assert set(result["speedup_vs_naive"]) == {"pipeline", "pipeline_tta", "service", "service_tta"}
    assert result["speedup_vs_naive"]["service_tta"] is None  # not asked for
    assert {"hash", "decode", "geometry", "standardizer", "classifier", "database", "move"} <= set(result["stages"])
    assert result["peak_rss_mb"]["bench_process"] > 0 and result["peak_rss_mb"]["service"] > 0
    # the service really filed every image, and the drop folder is empty again
    service_dir = tmp_path / "work" / "service"
    assert len([p for p in (service_dir / "archive").rglob("cell-*") if p.is_file()]) == 6
    assert not any(p for p in (service_dir / "drop").iterdir() if not p.name.startswith("."))  # the init marker
    printed = capsys.readouterr().out
    assert "images/s" in printed and "x naive" in printed


@pytest.mark.slow
def test_service_reports_first_result_and_steady_state_apart(tmp_path: Path) -> None:
    """The real service over 10 files in batches of 4: the time to first result and a steady-state rate over
    the batches between the first and the last, with stage shares from the service's own step timers."""
    out = tmp_path / "tput.json"
    assert main(["bench", "throughput", "--device", "cpu", "--images", "10", "--batch-size", "4", "--preset", "cpu",
                 "--modes", "pipeline,service", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    service = result["service"]
    assert 0 < service["time_to_first_result_s"] <= service["seconds"]
    rows = batch_rows(tmp_path / "work" / "service" / "stainbridge.db")
    assert len(rows) >= 3 and sum(rows) == 10 and max(rows) <= 4
    assert service["steady_images"] == 10 - rows[0] - rows[-1]  # neither the first nor the last batch
    assert service["steady_images_per_s"] > 0 and 0 < service["steady_seconds"] < service["seconds"]
    pipeline = result["pipeline"]  # timed before and again right after the service; the ratio uses both
    mean_rate = (pipeline["images_per_s"] + pipeline["after_service"]["images_per_s"]) / 2
    assert service["steady_vs_pipeline"] == pytest.approx(service["steady_images_per_s"] / mean_rate, rel=0.01)
    assert service["steady_cpu_ms_per_image"] > 0 and result["pipeline"]["cpu_ms_per_image"] > 0
    by_step = service["steady_cpu_ms_per_image_by_step"]
    assert {"hash", "claim", "decode_and_inference", "record", "file", "rest"} == set(by_step)
    assert by_step["decode_and_inference"] > 0  # the networks' CPU, as the service's own timers saw it
    assert result["stages_window"].startswith("steady state")
    for stage in ("hash", "decode", "standardizer", "classifier", "database", "move", "service_loop"):
        assert result["stages"][stage]["service_ms_per_image"] >= 0, stage
    assert result["stages"]["database"]["service_ms_per_image"] > 0  # claim + results transactions, as logged
    assert result["stages"]["standardizer"]["service_ms_per_image"] > 0


def batch_rows(database: Path) -> list[int]:
    """Rows per results transaction (one processed_at per batch), oldest first."""
    with sqlite3.connect(database) as connection:
        return [n for (n,) in connection.execute(
            "SELECT count(*) FROM images GROUP BY processed_at ORDER BY processed_at")]


def test_steady_state_leaves_out_the_first_and_the_last_batch() -> None:
    """Rows of the batches between the first and the last, over the time from the first batch's commit to the
    last but one's: neither the quiet time before the first nor the last, partial batch's wait is in the rate."""
    t0 = datetime(2026, 12, 1, 7, 0, 0)
    batches = [(t0, 16), (t0 + timedelta(seconds=0.5), 16), (t0 + timedelta(seconds=1.5), 16),
               (t0 + timedelta(seconds=2.5), 8)]
    assert steady_state(batches) == (32, 1.5)
    assert steady_state(batches[:2]) == (0, 0.0)  # two batches: no steady state to speak of
    assert steady_state([]) == (0, 0.0)


def test_batch_steps_are_read_from_the_services_batch_lines(tmp_path: Path) -> None:
    """`steps_ms` (or `steps_cpu_ms`) of each `batch` line, in seconds and in order; other lines and batch lines
    without it are skipped."""
    lines = [
        {"event": "batch", "steps_ms": {"hash": 2.0, "record": 10.0}, "steps_cpu_ms": {"hash": 1.0}},
        {"event": "classified", "latency_ms": 3.0},
        {"event": "batch", "done": 1},
        {"event": "batch", "steps_ms": {"hash": 4.0, "file": 6.0}, "steps_cpu_ms": {"file": 3.0}},
    ]
    log = tmp_path / "service.log"
    log.write_text("not json\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    steps = batch_steps(log)
    assert steps == [{"hash": 0.002, "record": 0.01}, {"hash": 0.004, "file": 0.006}]
    assert sum_steps(steps[1:]) == {"hash": 0.004, "file": 0.006}
    assert sum_steps(steps) == pytest.approx({"hash": 0.006, "record": 0.01, "file": 0.006})
    assert batch_steps(log, "steps_cpu_ms") == [{"hash": 0.001}, {"file": 0.003}]


def test_images_are_distinct_jpeg_and_png_of_the_reference_frame(tmp_path: Path) -> None:
    paths = make_images(tmp_path, 4)
    assert [p.suffix for p in paths] == [".jpg", ".png", ".jpg", ".png"]
    assert len({p.read_bytes() for p in paths}) == 4
    with Image.open(paths[0]) as img:
        assert img.size == FRAME


def test_uses_given_checkpoints_in_process_modes(tmp_path: Path) -> None:
    """With --classifier the numbers are for that checkpoint (standardizer "none"); --modes picks modes."""
    model = build_classifier(arch="resnet18", num_classes=len(CLASSES))
    header = {"kind": "classifier", "architecture": "resnet18", "arch_args": {"num_classes": len(CLASSES)},
              "classes": list(CLASSES), "input_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    path = tmp_path / "clf.safetensors"
    save_checkpoint(path, {k: v.detach().clone() for k, v in model.state_dict().items()}, header)
    out = tmp_path / "t.json"
    assert main(["bench", "throughput", "--device", "cpu", "--images", "3", "--batch-size", "2",
                 "--classifier", str(path), "--modes", "naive,pipeline", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["classifier"] == "clf" and result["input_size"] == 32 and result["standardizer"] == "none"
    assert result["naive"]["images"] == 3 and result["pipeline"]["images"] == 3 and result["service"] is None
    assert result["speedup_vs_naive"]["service"] is None


def test_unknown_mode_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "throughput", "--device", "cpu", "--images", "1", "--modes", "naive,gpu"]) == 2
    assert "--modes" in capsys.readouterr().err


def test_cuda_requested_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Asking for cuda where there is none exits 2 with a message instead of a traceback."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "throughput", "--device", "cuda", "--images", "1"]) == 2
    assert "cuda" in capsys.readouterr().err.lower()


def test_log_stages_splits_batches_into_move_inference_and_the_rest(tmp_path: Path) -> None:
    """From the service's JSON log: move = batch - last classified; the rest excludes latency_ms."""
    lines = [
        {"event": "ready", "timestamp": "2026-12-01T07:00:00.000000Z"},
        {"event": "classified", "latency_ms": 100.0, "timestamp": "2026-12-01T07:00:00.500000Z"},
        {"event": "classified", "latency_ms": 100.0, "timestamp": "2026-12-01T07:00:00.500100Z"},
        {"event": "batch", "timestamp": "2026-12-01T07:00:00.600100Z"},
    ]
    log = tmp_path / "service.log"
    log.write_text("not json\n" + "\n".join(json.dumps(x) for x in lines) + "\n")
    stages, batches = log_stages(log)
    assert batches == 1
    assert stages["move"] == pytest.approx(0.1)
    assert stages["decode_and_inference"] == pytest.approx(0.2)
    assert stages["intake_and_database"] == pytest.approx(0.3001)


def test_compile_falls_back_to_eager_when_compiling_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile` must never cost the run: a compiler error leaves both networks eager and says why."""
    from stainbridge.models import inference
    from stainbridge.models.bench import throughput

    classifier_path, standardizer_path = throughput._random_checkpoints("cpu", tmp_path)
    classifier = inference.load_classifier(classifier_path, device="cpu")
    standardizer = inference.load_standardizer(str(standardizer_path), device="cpu", classifier=classifier)
    eager_model = classifier.model

    def broken_compile(module: torch.nn.Module) -> torch.nn.Module:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError("no C++ compiler")
        return fail  # type: ignore[return-value]

    monkeypatch.setattr(torch, "compile", broken_compile)
    outcome = inference.compile_networks(standardizer, classifier, torch.rand(2, 3, 64, 64))
    assert outcome.startswith("eager (RuntimeError: no C++ compiler")
    assert classifier.model is eager_model
    assert classifier.predict(torch.rand(1, 3, 64, 64)).shape == (1, len(CLASSES))


@pytest.mark.slow
def test_tta_modes_run_the_service_with_models_tta(tmp_path: Path) -> None:
    """`pipeline-tta` and `service-tta`: the same images through run_batch(tta=True) and a real service whose
    config says `[models] tta = true`, side by side with the plain pipeline in one run."""
    out = tmp_path / "t.json"
    assert main(["bench", "throughput", "--device", "cpu", "--images", "4", "--batch-size", "2", "--preset", "cpu",
                 "--modes", "pipeline,pipeline-tta,service-tta", "--workdir", str(tmp_path / "work"),
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pipeline"]["images"] == result["pipeline_tta"]["images"] == 4
    assert result["service_tta"]["images"] == 4 and result["service_tta"]["failed"] == 0
    assert result["service"] is None and result["naive"] is None
    assert "tta = true" in (tmp_path / "work" / "service-tta" / "stainbridge.toml").read_text()
