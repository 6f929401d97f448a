"""`stainbridge bench throughput`: files to results, naive loop vs batched pipeline vs the real service.

One run, the same generated images (360x363 px, half JPEG, half PNG), three modes (and, on request,
``pipeline-tta`` and ``service-tta``: the same with ``[models] tta``, the 8-view mean per cell):

- naive: one image at a time, PIL decode, float32, the networks called per image;
- pipeline: the one inference path in-process, batched (decode + ``inference.run_batch``);
- service: the real `stainbridge run` process on a fresh drop folder and SQLite database, timed
  from the first file dropped to the last row committed (``models.bench.service_run``).

It prints images/s per mode, the ratios to naive, per-stage time shares (hash, decode, geometry,
standardizer, classifier measured in-process; database and move from the service's log) and peak
resident memory. Without checkpoints it builds networks of the preset with random weights (speed
does not depend on the weights) and saves them as checkpoints for the service to load.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from stainbridge.models import inference
from stainbridge.models.bench import throughput_modes as modes
from stainbridge.models.bench.service_run import ServiceResult, ServiceRunError, run_service, sum_steps
from stainbridge.models.checkpoint import CheckpointError, save_checkpoint
from stainbridge.models.classifier import build_classifier
from stainbridge.models.cyclegan import GENERATOR_PRESETS, GENERATORS
from stainbridge.models.imaging.synthetic import CLASSES

# preset: standardizer (architecture, arch_args), classifier (architecture, input px), batch size, geometry
PRESETS: dict[str, dict] = {
    # tiny ResNet generator + torchvision ResNet-18 at 64 px, whole-frame geometry (the old default)
    "tiny": {"standardizer": ("resnet_generator", GENERATOR_PRESETS["tiny"]), "classifier": ("resnet18", 64),
             "batch_size": 16, "window": False},
    # the service's default recipe on a CPU: colour-only CycleGAN generator + width-16 ResNet-18 at 64 px,
    # cells windowed by the site magnification (as `bench accuracy --preset cpu` trains them)
    "cpu": {"standardizer": ("pointwise_colour", {"hidden": 32, "layers": 2}), "classifier": ("resnet18_w16", 64),
            "batch_size": 16, "window": True},
    # the reference CycleGAN generator at 256 px + ResNet-18 (a GPU's job)
    "full": {"standardizer": ("resnet_generator", GENERATOR_PRESETS["full"]), "classifier": ("resnet18", 256),
             "batch_size": 32, "window": False},
}
MODES = ("naive", "pipeline", "pipeline-tta", "service", "service-tta")
WINDOW_FRACTION = 0.6  # reference window = 0.6 x the 360 px frame, as in bench accuracy's presets
MAGNIFICATION = 0.9  # a plausible site profile (BCCD -> PBC measured 0.895)
SERVICE_TIMEOUT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--images", type=int, default=1000,
                        help="images per mode (default 1000: the service's steady state needs many batches)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="networks when no checkpoints are given: tiny (default), cpu (the service's recipe: "
                             "colour-only CycleGAN + resnet18_w16 at 64 px), full (reference generator at 256 px)")
    parser.add_argument("--classifier", help="classifier checkpoint (default: random network of the preset)")
    parser.add_argument("--standardizer", help="standardizer checkpoint or none/reinhard/macenko "
                                                "(default: random generator of the preset; 'none' with --classifier)")
    parser.add_argument("--batch-size", type=int, help="images per batch, in-process and in the service "
                                                       "(default: the preset's)")
    parser.add_argument("--modes", default="naive,pipeline,service",
                        help="comma-separated subset of naive,pipeline,pipeline-tta,service,service-tta "
                             "(default: naive,pipeline,service; the -tta modes run with [models] tta)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the networks for the pipeline mode (eager if compiling fails)")
    parser.add_argument("--workdir", help="keep images, checkpoints and the service's folder here (default: a temp dir)")
    parser.add_argument("--json", help="also write the numbers here")


def _random_checkpoints(preset: str, folder: Path) -> tuple[Path, Path]:
    """The preset's networks with random weights, saved as checkpoints the service can load."""
    spec = PRESETS[preset]
    arch, size = spec["classifier"]
    model = build_classifier(arch=arch, num_classes=len(CLASSES))
    header: dict = {"kind": "classifier", "architecture": arch, "arch_args": {"num_classes": len(CLASSES)},
                    "classes": list(CLASSES), "input_size": size,
                    "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    std_arch, std_args = spec["standardizer"]
    std_header: dict = {"kind": "standardizer", "architecture": std_arch, "arch_args": dict(std_args)}
    if spec["window"]:
        header["geometry"] = {"reference_window_px": WINDOW_FRACTION * modes.FRAME[0], "window_fraction": WINDOW_FRACTION}
        std_header["site_profile"] = {"magnification": MAGNIFICATION, "method": "fixed by bench throughput"}
    classifier_path, standardizer_path = folder / f"random-{preset}-classifier.safetensors", folder / f"random-{preset}-standardizer.safetensors"
    save_checkpoint(classifier_path, {k: v.detach().clone() for k, v in model.state_dict().items()}, header)
    generator = GENERATORS[std_arch](**std_args)
    save_checkpoint(standardizer_path, {k: v.detach().clone() for k, v in generator.state_dict().items()}, std_header)
    return classifier_path, standardizer_path


def key(mode: str) -> str:
    """The JSON key of a mode ("pipeline-tta" -> "pipeline_tta")."""
    return mode.replace("-", "_")


def _rate(done: int, seconds: float) -> dict:
    return {"images_per_s": round(done / seconds, 2) if seconds > 0 else None, "images": done, "seconds": round(seconds, 3)}


def _cpu_seconds() -> float:
    """This process's CPU time so far (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed_pipeline(paths: list[Path], standardizer: inference.Standardizer, classifier: inference.Classifier,
                    batch_size: int) -> dict:
    """The pipeline mode's rate, with this process's CPU milliseconds per image."""
    cpu_before = _cpu_seconds()
    rate = _rate(*modes.pipeline(paths, standardizer, classifier, batch_size=batch_size))
    rate["cpu_ms_per_image"] = round(1000 * (_cpu_seconds() - cpu_before) / len(paths), 3)
    return rate


def _mean_of_passes(pipeline: dict | None, key: str) -> float | None:
    """`key` of the pipeline, averaged with its pass after the service when there is one."""
    values = [v for v in ((pipeline or {}).get(key), ((pipeline or {}).get("after_service") or {}).get(key)) if v]
    return sum(values) / len(values) if values else None


def _steady(service: ServiceResult, pipeline: dict | None) -> dict:
    """The service's time to first result and steady state, and its ratios to the in-process pipeline
    (images/s, and CPU milliseconds per image: the one that holds still on a shared machine), the
    pipeline's passes before and after the service averaged."""
    rate = service.steady_images_per_s
    cpu_ms = (1000 * service.steady_cpu_seconds / service.steady_cpu_images
              if service.steady_cpu_seconds is not None and service.steady_cpu_images else None)
    pipe_rate, pipe_cpu = _mean_of_passes(pipeline, "images_per_s"), _mean_of_passes(pipeline, "cpu_ms_per_image")
    by_step: dict[str, float] | None = None
    if service.steady_images and service.batch_cpu_steps:
        by_step = {step: 1000 * seconds / service.steady_images
                   for step, seconds in sum_steps(service.batch_cpu_steps[1:-1]).items()}
        # "inference" is part of "decode_and_inference"; "rest": the loop, the watcher's thread, logging
        by_step = {k: round(v, 3) for k, v in by_step.items() if k != "inference"}
        if cpu_ms:
            by_step["rest"] = round(max(0.0, cpu_ms - sum(by_step.values())), 3)
    return {
        "time_to_first_result_s": round(service.time_to_first_result, 3) if service.time_to_first_result else None,
        "steady_images_per_s": round(rate, 2) if rate else None,
        "steady_images": service.steady_images, "steady_seconds": round(service.steady_seconds, 3),
        "steady_cpu_ms_per_image": round(cpu_ms, 3) if cpu_ms else None,
        "steady_cpu_ms_per_image_by_step": by_step,
        "steady_vs_pipeline": round(rate / pipe_rate, 3) if rate and pipe_rate else None,
        "pipeline_vs_steady_cpu": round(pipe_cpu / cpu_ms, 3) if cpu_ms and pipe_cpu else None,
    }


COMPUTE = ("decode", "geometry", "standardizer", "classifier")
NETWORKS = ("geometry", "standardizer", "classifier")  # what inference.run_batch runs


def _stages(inproc: dict[str, float], n: int, service: dict | None) -> dict:
    """Per stage: milliseconds per image measured in-process (batched) and, with a service run, in
    the service (its own step timers, summed over the steady-state batches) with its share of the
    service's steady-state time per image.

    ``service``: ``{"steps": seconds per step, "seconds": the window, "images": rows in it}``. The
    service's inference time is split over geometry, standardizer and classifier in the in-process
    proportions; its "decode" is decoding not hidden behind inference. Without a service run the
    shares are of the in-process sum."""
    ms = {k: 1000 * v / n for k, v in inproc.items()}
    out: dict[str, dict] = {k: {"ms_per_image": round(v, 3), "source": "in-process, batched"} for k, v in ms.items()}
    if service is None:
        total = sum(ms.values())
        for value in out.values():
            value["share"] = round(value["ms_per_image"] / total, 3) if total > 0 else None
        return out
    steps, images = service["steps"], service["images"]
    per_image = {step: 1000 * seconds / images for step, seconds in steps.items()}
    total = 1000 * service["seconds"] / images
    networks_inproc = sum(ms[k] for k in NETWORKS)
    inference_ms = per_image.get("inference", 0.0)
    service_ms = {"hash": per_image.get("hash", 0.0),
                  "decode": max(0.0, per_image.get("decode_and_inference", 0.0) - inference_ms)}
    for k in NETWORKS:
        service_ms[k] = inference_ms * ms[k] / networks_inproc if networks_inproc > 0 else 0.0
    service_ms["database"] = per_image.get("claim", 0.0) + per_image.get("record", 0.0)
    service_ms["move"] = per_image.get("file", 0.0)
    service_ms["service_loop"] = per_image.get("next_batch", 0.0)
    service_ms["other"] = max(0.0, total - sum(service_ms.values()))
    sources = {
        "hash": "service: open + sha256 of the batch's files in the intake threads",
        "decode": "service: decoding not overlapped with inference (the wait for the first half of the batch)",
        "database": "service: the claim transaction and the results transaction (with its per-image log lines)",
        "move": "service: renames into the archive, one fsync per folder, the archive_path transaction",
        "service_loop": "service: between batches, before the pipeline: stale-claim release, model swap check, "
                        "disk space, the watcher's ready files",
        "other": "service time per image that no step above explains (the loop's bookkeeping, the batch log line)",
    }
    for k in NETWORKS:
        sources[k] = "service: inference time (run_batch), split in the in-process proportions"
    for k, text_ in sources.items():
        entry = out.setdefault(k, {"ms_per_image": round(service_ms[k], 3)})  # measured in the service only
        entry["source"] = (f"{entry['source']}; " if entry.get("source") else "") + text_
    for k, value in out.items():
        value["service_ms_per_image"] = round(service_ms.get(k, 0.0), 3)
        value["share"] = round(service_ms.get(k, 0.0) / total, 3) if total > 0 else None
    return out


def measure(args: argparse.Namespace) -> dict:
    device = inference.resolve_device(args.device)
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(wanted) - set(MODES)
    if unknown or not wanted:
        raise ValueError(f"--modes takes {', '.join(MODES)}, got {args.modes!r}")
    batch_size = args.batch_size or PRESETS[args.preset]["batch_size"]
    with tempfile.TemporaryDirectory(prefix="stainbridge-tput-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.classifier:
            classifier_path, standardizer_spec = Path(args.classifier), args.standardizer or "none"
        else:
            classifier_path, random_std = _random_checkpoints(args.preset, work)
            standardizer_spec = args.standardizer or str(random_std)
        classifier = inference.load_classifier(classifier_path, device=str(device))
        standardizer = inference.load_standardizer(standardizer_spec, device=str(device), classifier=classifier)
        started = time.monotonic()
        paths = modes.make_images(work / "images", args.images)
        print(f"drew {len(paths)} images of {modes.FRAME[0]}x{modes.FRAME[1]} px in {time.monotonic() - started:.1f} s",
              flush=True)
        result: dict = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "preset": None if args.classifier else args.preset,
            "standardizer": standardizer.name, "classifier": classifier.name, "input_size": classifier.input_size,
            "batch_size": batch_size, "images": len(paths), "formats": {"jpeg": (len(paths) + 1) // 2, "png": len(paths) // 2},
            **{key(mode): None for mode in MODES},
        }
        if "naive" in wanted:
            result["naive"] = _rate(*modes.naive(paths, standardizer, classifier))
            print(f"  naive     {result['naive']['images_per_s']:>8} images/s", flush=True)
        if "pipeline" in wanted:
            if args.compile:
                sample = inference.prepare_batch([modes.decode(p) for p in paths[:batch_size]],
                                                 inference.resolve_geometry(classifier, standardizer))
                result["compile"] = inference.compile_networks(standardizer, classifier, sample)
            result["pipeline"] = _timed_pipeline(paths, standardizer, classifier, batch_size)
            print(f"  pipeline  {result['pipeline']['images_per_s']:>8} images/s", flush=True)
        if "pipeline-tta" in wanted:
            result["pipeline_tta"] = _rate(*modes.pipeline(paths, standardizer, classifier, batch_size=batch_size,
                                                           tta=True))
            print(f"  pipeline-tta {result['pipeline_tta']['images_per_s']:>5} images/s", flush=True)
        inproc = modes.stage_times(paths, standardizer, classifier, batch_size=batch_size)
        # the service runs from its own folder: a checkpoint path must be absolute, a method name stays as it is
        service_standardizer = (str(Path(standardizer_spec).resolve()) if Path(standardizer_spec).exists()
                                else standardizer_spec)
        if "service" in wanted:
            service = run_service(paths, work / "service", classifier=classifier_path.resolve(),
                                  standardizer=service_standardizer, device=str(device), batch_size=batch_size,
                                  timeout=SERVICE_TIMEOUT_S)
            if result["pipeline"]:  # again, right after the service: the ratio is not one of two machine loads
                again = _timed_pipeline(paths, standardizer, classifier, batch_size)
                result["pipeline"]["after_service"] = {k: again[k] for k in ("images_per_s", "cpu_ms_per_image")}
                print(f"  pipeline  {again['images_per_s']:>8} images/s (again, after the service)", flush=True)
            result["service"] = {**_rate(service.images, service.seconds), **_steady(service, result["pipeline"]),
                                 "failed": service.failed, "startup_s": round(service.startup_seconds, 2),
                                 "batches": service.batches, "exit_code": service.exit_code,
                                 "log_stages_s": {k: round(v, 3) for k, v in service.log_stages.items()}}
            print(f"  service   {result['service']['images_per_s']:>8} images/s (burst), steady "
                  f"{result['service']['steady_images_per_s']} images/s, first result after "
                  f"{result['service']['time_to_first_result_s']} s", flush=True)
            steady = service.steady_images > 0
            service_info = {"steps": sum_steps(service.batch_steps[1:-1] if steady else service.batch_steps),
                            "seconds": service.steady_seconds if steady else service.seconds,
                            "images": service.steady_images if steady else service.images}
            result["stages_window"] = "steady state (the batches between the first and the last)" if steady else "whole run"
        else:
            service_info, service = None, None
        if "service-tta" in wanted:
            with_tta = run_service(paths, work / "service-tta", classifier=classifier_path.resolve(),
                                   standardizer=service_standardizer, device=str(device), batch_size=batch_size,
                                   timeout=SERVICE_TIMEOUT_S, tta=True)
            result["service_tta"] = {**_rate(with_tta.images, with_tta.seconds),
                                     **_steady(with_tta, result["pipeline_tta"]), "failed": with_tta.failed,
                                     "exit_code": with_tta.exit_code}
            print(f"  service-tta {result['service_tta']['images_per_s']:>6} images/s", flush=True)
        result["stages"] = _stages(inproc, len(paths), service_info)
        base = (result["naive"] or {}).get("images_per_s")
        result["speedup_vs_naive"] = {
            key(mode): round(result[key(mode)]["images_per_s"] / base, 2) if base and result[key(mode)] else None
            for mode in MODES if mode != "naive"}
        result["peak_rss_mb"] = {
            "bench_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "service": round(service.peak_rss_mb, 1) if service and service.peak_rss_mb else None}
    return result


def _print(result: dict) -> None:
    print(f"device {result['device']} ({result['device_name']}), {result['threads']} torch threads, "
          f"standardizer {result['standardizer']}, classifier {result['classifier']} at {result['input_size']} px, "
          f"batch {result['batch_size']}, {result['images']} images (JPEG+PNG, 360x363)")
    for mode in MODES:
        if result[key(mode)]:
            ratio = result["speedup_vs_naive"].get(key(mode))
            extra = f"  ({ratio:.2f}x naive)" if ratio else ""
            entry = result[key(mode)]
            print(f"  {mode:<12} {entry['images_per_s']:>9.1f} images/s{extra}"
                  + (f", {entry['after_service']['images_per_s']:.1f} again after the service"
                     if entry.get("after_service") else ""))
            if entry.get("steady_images_per_s") is not None:
                pipe_cpu = _mean_of_passes(result[key(mode).replace("service", "pipeline")], "cpu_ms_per_image")
                print(f"  {'':<12} steady state {entry['steady_images_per_s']:.1f} images/s over "
                      f"{entry['steady_images']} images ({entry['steady_vs_pipeline'] or '-'}x the in-process "
                      f"pipeline; CPU {entry['steady_cpu_ms_per_image'] or '-'} ms per image against "
                      f"{f'{pipe_cpu:.3f}' if pipe_cpu else '-'}), first result after "
                      f"{entry['time_to_first_result_s']} s")
            if entry.get("steady_cpu_ms_per_image_by_step"):
                print(f"  {'':<12} its CPU ms per image by step: " + ", ".join(
                    f"{step} {ms:.2f}" for step, ms in entry["steady_cpu_ms_per_image_by_step"].items()))
    with_service = result["service"] is not None
    print("  stages, ms per image in-process" + (f", in the service, share of the service's time "
                                                 f"({result['stages_window']}):" if with_service
                                                 else ", share of the in-process sum:"))
    for stage, value in result["stages"].items():
        share = f"{value['share']:.0%}" if value.get("share") is not None else "-"
        in_service = f"{value['service_ms_per_image']:>8.2f}" if with_service else ""
        inproc = f"{value['ms_per_image']:>8.2f}" if value["source"].startswith("in-process") else f"{'-':>8}"
        print(f"    {stage:<13} {inproc} {in_service}  {share:>4}")
    rss = result["peak_rss_mb"]
    print(f"  peak RSS: bench process {rss['bench_process']} MiB, service {rss['service']} MiB")


def run(args: argparse.Namespace) -> int:
    if args.images < 1:
        print("stainbridge bench throughput: --images must be at least 1", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print("stainbridge bench throughput: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        result = measure(args)
    except (inference.ModelMismatch, inference.DeviceUnavailable, CheckpointError, FileNotFoundError,
            ValueError, ServiceRunError) as exc:
        print(f"stainbridge bench throughput: {exc}", file=sys.stderr)
        return 2
    _print(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(run(get_args_parser().parse_args()))
