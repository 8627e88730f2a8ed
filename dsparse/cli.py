"""``dsparse`` command line: thin verbs over the library.

    dsparse demo                                   # synth data, train, eval, table
    dsparse data synth --out data/synthetic        # procedural multitask scenes as shards
    dsparse data convert {nyuv2,cityscapes,taskonomy,folders} SRC OUT [--workers N] [--on-error skip]
    dsparse data check DATA_DIR                    # decode every sample, report problems
    dsparse prune CONFIG.yaml --method disparse --sparsity 0.9 [--criterion snip] [--from RUN] [--granularity block|channel]
    dsparse train CONFIG.yaml [--set k=v ...] [--masks masks.pt] [--resume] [--stop-after N]
    dsparse eval RUN_OR_CHECKPOINT_OR_EXPORT [--baseline RUN] [--out metrics.json]
    dsparse export RUN --out model.pt              # kept blocks/weights + layout + config
    dsparse analyze MASKS_OR_RUN [--branch]        # per-task mask IoU per layer, watershed, plots
    dsparse report RUN... | --sweep DIR | --experiment NAME [--out FILE]   # paper-style table

Multi-process: ``torchrun --nproc_per_node 2 -m dsparse train CONFIG.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path


def _setup_logging(quiet: bool = False) -> None:
    """One logging setup for every verb: progress and info lines on stderr (``--quiet``:
    warnings and errors only), so stdout carries only results (``--json``: one object)."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    logging.getLogger().setLevel(level)  # also when a handler was installed before (basicConfig then does nothing)
    for noisy in ("DeepSpeed", "deepspeed", "alembic", "mlflow", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _say(args, text: str) -> None:
    """Human-readable output on stdout; suppressed by ``--json`` (the result is printed as JSON instead)."""
    if not args.json and _is_rank_zero():
        print(text)


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _cmd_synth(args) -> dict:
    from dsparse.data.synth.dataset import write_synthetic_dataset

    manifest = write_synthetic_dataset(args.out, num_train=args.num_train, num_val=args.num_val, size=args.size,
                                       seed=args.seed, shard_size=args.shard_size, num_procs=args.procs,
                                       overwrite=args.overwrite, codec=_codec(args))
    counts = {split: info.num_samples for split, info in manifest.splits.items()}
    _say(args, f"wrote {counts} samples with tasks {manifest.tasks} to {args.out}")
    return {"out": args.out, "samples": counts, "tasks": manifest.tasks}


def _codec(args):
    from dsparse.data.codecs import DatasetCodec

    if args.jpeg_quality is not None and args.rgb_encoding != "jpeg":
        raise ValueError("--jpeg-quality sets the quality of JPEG images; add --rgb-encoding jpeg, or drop it")
    quality = {} if args.jpeg_quality is None else {"jpeg_quality": args.jpeg_quality}
    return DatasetCodec(labels=args.encoding, rgb=args.rgb_encoding, **quality)


def _add_codec_flags(parser) -> None:
    from dsparse.data.codecs import CODECS, LABEL_CODECS
    from dsparse.data.writer import DEFAULT_CODEC

    parser.add_argument("--encoding", choices=LABEL_CODECS, default=DEFAULT_CODEC.labels,
                        help=f"how labels (and, unless --rgb-encoding, the image) are stored: zstd-compressed raw "
                             f"arrays (fast to decode) or PNG (default: {DEFAULT_CODEC.labels})")
    parser.add_argument("--rgb-encoding", choices=sorted(CODECS), default=None,
                        help="the image's encoding, if not --encoding's: jpeg is lossy and about 10x smaller")
    parser.add_argument("--jpeg-quality", type=int, default=None,
                        help="JPEG quality 1-100 (with --rgb-encoding jpeg; default 95)")


def _cmd_convert(args) -> dict:
    from dsparse.data.convert import CONVERTERS, convert

    options = {option.name.replace("-", "_"): getattr(args, option.name.replace("-", "_"))
               for option in CONVERTERS[args.converter].options}
    manifest = convert(args.converter, args.src, args.out, splits=args.split, workers=args.workers,
                       shard_size=args.shard_size, on_error=args.on_error, overwrite=args.overwrite,
                       codec=_codec(args), **options)
    counts = {split: info.num_samples for split, info in manifest.splits.items()}
    shards = sum(len(info.shards) for info in manifest.splits.values())
    _say(args, f"wrote {counts} samples in {shards} shards with tasks {manifest.tasks} to {args.out}"
          + (f"; skipped {len(manifest.skipped)} bad sample(s) or source(s), listed in manifest.json"
             if manifest.skipped else ""))
    from dsparse.config import load_config

    preset = args.converter
    same_tasks = preset != "folders" and load_config(preset).tasks == manifest.tasks
    command = (f"dsparse train {preset} --set data.path={args.out}"
               + ("" if same_tasks else f" --set \"tasks=[{', '.join(manifest.tasks)}]\""))
    _say(args, f"train on it: {command}")
    return {"out": args.out, "samples": counts, "shards": shards, "tasks": manifest.tasks,
            "skipped": manifest.skipped, "train_command": command}


def _cmd_check(args) -> dict:
    from dsparse.data.check import check_dataset

    report = check_dataset(args.data_dir, args.split)
    for problem in report.problems:
        _say(args, problem)
    _say(args, f"{report.num_samples} samples read ({report.codec}), {len(report.problems)} problem(s)")
    args.exit_code = 0 if report.ok else 1
    return {"samples": report.num_samples, "problems": report.problems, "ok": report.ok, "codec": report.codec}


def _cmd_train(args) -> dict:
    from dsparse.config import load_config
    from dsparse.train.trainer import train

    overrides = list(args.set) + ([f"sparsity.masks={args.masks}"] if args.masks else [])
    resume = "auto" if args.resume_or_start else args.resume
    summary = train(load_config(args.config, overrides), resume=resume, stop_after=args.stop_after)
    _say(args, json.dumps({k: summary[k] for k in ("status", "step", "samples_per_s", "mlflow_run_id")}))
    return summary


def _cmd_prune(args) -> dict:
    from dsparse.config import load_config
    from dsparse.models import parameter_users
    from dsparse.runs.components import build_run_model, build_run_tasks
    from dsparse.train.sparsify import prune_run

    overrides = list(args.set) + [f"sparsity.method={args.method}", f"sparsity.target={args.sparsity}"]
    for key, value in (("criterion", args.criterion), ("from_checkpoint", args.from_checkpoint),
                       ("num_batches", args.num_batches), ("scope", args.scope),
                       ("granularity", args.granularity), ("block", args.block), ("budget", args.budget),
                       ("channel_multiple", args.channel_multiple), ("min_density", args.min_density)):
        if value is not None:
            overrides.append(f"sparsity.{key}={value}")
    if args.keep_first_dense:
        overrides.append("sparsity.keep_first_dense=true")
    config = load_config(args.config, overrides)
    if args.block is not None and config.sparsity.granularity != "block":
        raise ValueError(f"--block {args.block} sets the block of block masks; add --granularity block (the config "
                         "asks for element masks)")
    masks = prune_run(config, args.out, overwrite=args.overwrite)
    from dsparse.data.manifest import load_manifest

    dense_model = build_run_model(config, build_run_tasks(config, load_manifest(config.data.path)))
    users = parameter_users(dense_model)
    if masks.meta.get("granularity") == "channel":
        from dsparse.sparsity.channel.prune import channel_table

        _say(args, channel_table(dense_model, masks))
        _say(args, f"requested sparsity {args.sparsity:.4f} of the {masks.meta['budget']}, achieved "
                   f"{masks.meta['budget_sparsity_achieved']:.6f} ({masks.meta['cost_kept']:,} of "
                   f"{masks.meta['cost_total']:,} kept); wrote {args.out}")
    else:
        _say(args, masks.format_table(users))
        at_floor = masks.meta.get("layers_at_floor") or []
        if at_floor:
            _say(args, f"{len(at_floor)} layer(s) held at their floor (sparsity.min_density "
                       f"{masks.meta['min_density']}): {', '.join(at_floor)}")
        _say(args, f"requested sparsity {args.sparsity:.4f}, achieved {masks.sparsity:.6f} "
                   f"({masks.num_kept} of {masks.num_total} weights kept); wrote {args.out}")
    return {"out": args.out, "requested": args.sparsity, "achieved": masks.sparsity, "kept": masks.num_kept,
            "total": masks.num_total, "layers": masks.layer_table(users)}


def _cmd_eval(args) -> dict:
    from dsparse.evaluation import evaluate_checkpoint
    from dsparse.evaluation.loop import format_metrics_table

    if args.out:  # fail before the evaluation, not after it
        from dsparse.io import check_output_file

        check_output_file(args.out, args.overwrite)
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create the directory of --out {args.out} ({error.strerror or error})") from None
    result = evaluate_checkpoint(args.checkpoint, data_path=args.data, split=args.split, baseline=args.baseline,
                                 max_batches=args.max_batches)
    deltas = {"delta_t_%": result["delta_t"]} if "delta_t" in result else None
    _say(args, format_metrics_table(result["metrics"], deltas))
    if args.out:
        from dsparse.io import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=2))
        _say(args, f"wrote {args.out}")
    return result


def _cmd_export(args) -> dict:
    keep = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_revote and keep is None:
        raise ValueError("--no-revote applies to task extraction; add --tasks (e.g. --tasks seg,depth)")
    if args.format == "onnx":
        from dsparse.onnx_export import export_onnx

        result = export_onnx(args.run, args.out, overwrite=args.overwrite, keep_tasks=keep, revote=not args.no_revote)
        _say(args, f"wrote {result['path']}: {result['num_bytes'] / 2**20:.2f} MiB, ONNX opset 17, input rgb "
                   f"[batch, 3, {result['input_size'][0]}, {result['input_size'][1]}], outputs "
                   f"{', '.join(result['tasks'])}; ONNX Runtime matches PyTorch within {result['max_difference']:.2g}")
        return result
    from dsparse.export import export_run

    report = export_run(args.run, args.out, overwrite=args.overwrite, keep_tasks=keep, revote=not args.no_revote)
    _say(args, f"wrote {report.path}: {report.num_bytes / 2**20:.2f} MiB, {100 * report.ratio:.1f}% of the dense "
               f"model's {report.dense_bytes / 2**20:.2f} MiB ({report.granularity} masks, sparsity "
               f"{report.sparsity:.4f})")
    import dataclasses

    return dataclasses.asdict(report)


def _cmd_sweep(args) -> dict:
    from dsparse.sweep.runner import run_sweep
    from dsparse.sweep.spec import load_sweep_spec

    spec = load_sweep_spec(args.spec)
    out = args.out or f"runs/sweeps/{spec.name}"
    rows = run_sweep(spec, out, address=args.address, resume=args.resume, storage=args.storage)
    unfinished = [row for row in rows if row["status"] != "complete"]
    _say(args, f"{len(rows)} trials: {len(rows) - len(unfinished)} complete"
          + "".join(f"; {row['trial']}: {row['status']}" for row in unfinished))
    from dsparse.report import build_report, to_markdown, to_records, write_report

    result = {"out": out, "trials": rows, "report": None}
    try:
        report = build_report(sweep=out)
    except ValueError as error:  # e.g. a learning-rate search without a dense trial: no Delta_T table
        _say(args, f"no comparison table: {error}")
    else:
        _say(args, to_markdown(report))
        _say(args, "table: " + ", ".join(str(p) for p in write_report(report, Path(out) / "report", overwrite=True)))
        result["report"] = to_records(report)
    _say(args, f"per trial: {Path(out) / 'results.csv'} and results.png")
    from dsparse.config import config_from_dict
    from dsparse.tracking.mlflow_tracker import resolve_tracking_uri, ui_command

    uri = resolve_tracking_uri(config_from_dict(spec.base_config()).tracking)
    _say(args, f"MLflow (the sweep is the parent run, trials are child runs): {ui_command(uri)}")
    return result


def _cmd_analyze(args) -> dict:
    from dsparse.analysis import analyze

    if not args.branch and (args.groups is not None or args.same_params or args.config):
        raise ValueError("--groups, --same-params and --config shape the branched config: add --branch")

    result = analyze(args.source, args.out, branch=args.branch, num_groups=args.groups, same_params=args.same_params,
                     config=args.config, overwrite=args.overwrite)
    final = result.source.final
    shared = final.shared_layers
    _say(args, f"{len(final.tasks)} tasks, {len(final.layers)} masked layers ({len(shared)} shared by two or more)"
          + (f", {len(result.source.analyses)} checkpoints (dynamic run: per-task masks are the tasks' nominations "
             "at the latest update)" if result.source.dynamic else ""))
    if final.watershed:
        _say(args, f"watershed: {final.watershed} (the mean IoU change point: {final.watershed_drop:.3f} lower from "
                   "there on than before)")
    for (a, b), value in final.pair_iou_matrix().items():
        _say(args, f"  {a}/{b}: mean IoU {value:.3f} over the layers both use")
    if result.plan is not None:
        _say(args, f"branched at {result.plan.branch_from}, groups {result.plan.groups}: {result.branched_config}")
        _say(args, f"train it: dsparse train {result.branched_config}")
    _say(args, f"wrote {len(result.paths)} files to {result.out_dir}"
          + (f"; logged to MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else ""))
    from dsparse.analysis.output import summarize

    payload = summarize(result.source)
    payload.update(files=[str(p) for p in result.paths], mlflow_run_id=result.mlflow_run_id,
                   branch=None if result.plan is None else {"branch_from": result.plan.branch_from,
                                                            "groups": result.plan.groups,
                                                            "config": str(result.branched_config)})
    return payload


def _cmd_report(args) -> dict:
    from dsparse.report import build_report, check_report_out, to_markdown, to_records, write_report

    if args.out:  # refused before the runs are read
        check_report_out(args.out, args.overwrite)
    report = build_report(args.runs, sweep=args.sweep, experiment=args.experiment, tracking_uri=args.tracking_uri,
                          constant=not args.no_constant, baselines=args.baseline, delta_t=args.delta_t)
    _say(args, to_markdown(report))
    paths = write_report(report, args.out, overwrite=args.overwrite) if args.out else []
    if paths:
        _say(args, "wrote " + ", ".join(str(p) for p in paths))
    return {"rows": to_records(report), "files": [str(p) for p in paths]}


def _cmd_demo(args) -> dict:
    from dsparse.demo import run_demo

    return run_demo(workdir=args.workdir, iterations=args.iterations, num_train=args.num_train, show=not args.json)


def _add_convert_parser(data, common) -> None:
    """``data convert NAME ...``: one sub-command per registered converter, with its options."""
    from dsparse.data.convert import CONVERTERS

    convert = data.add_parser("convert", parents=[common],
                              help="convert a real dataset into WebDataset shards (resumable)")
    names = convert.add_subparsers(dest="converter", required=True)
    for name, converter in CONVERTERS.items():
        sub = names.add_parser(name, parents=[common], help=converter.summary, description=converter.summary)
        sub.add_argument("src", help="dataset YAML" if name == "folders" else "dataset root directory")
        sub.add_argument("out", help="output directory (new or empty; rerun the command to resume)")
        sub.add_argument("--split", nargs="+", default=None,
                         help=f"source splits (default: {' '.join(converter.default_splits) or 'all'})")
        sub.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
        sub.add_argument("--shard-size", default="512MB", help="target shard size (512MB, 1GB) or samples per shard")
        sub.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                         help="stop at the first bad file, or skip and record it in the manifest")
        sub.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
        _add_codec_flags(sub)
        for option in converter.options:
            sub.add_argument(f"--{option.name}", default=option.default, type=option.type, choices=option.choices,
                             nargs=option.nargs, help=option.help)
        sub.set_defaults(func=_cmd_convert)


def _common_flags(top_level: bool) -> argparse.ArgumentParser:
    """``--quiet``, ``--json`` and ``--debug``, accepted before or after any verb."""
    common = argparse.ArgumentParser(add_help=False)
    default = False if top_level else argparse.SUPPRESS  # a verb's flag must not reset one given before it
    common.add_argument("--quiet", "-q", action="store_true", default=default,
                        help="no progress or info lines (warnings and errors only)")
    common.add_argument("--json", action="store_true", default=default,
                        help="print the final result as one JSON object on stdout (for scripts)")
    common.add_argument("--debug", action="store_true", default=default,
                        help="on an error, also print the full traceback (and a data-loader worker's)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsparse", description=__doc__.split("\n")[0],
                                     parents=[_common_flags(top_level=True)])
    common = _common_flags(top_level=False)
    verbs = parser.add_subparsers(dest="verb", required=True)

    data = verbs.add_parser("data", parents=[common], help="dataset tools")
    data = data.add_subparsers(dest="data_verb", required=True)
    synth = data.add_parser("synth", parents=[common],
                            help="render procedural multitask scenes into WebDataset shards")
    synth.add_argument("--out", default="data/synthetic")
    synth.add_argument("--num-train", type=int, default=4000)
    synth.add_argument("--num-val", type=int, default=500)
    synth.add_argument("--size", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-size", default="250", help="samples per shard, or a size such as 256MB")
    synth.add_argument("--procs", type=int, default=None, help="render processes (default: all cores)")
    _add_codec_flags(synth)
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    synth.set_defaults(func=_cmd_synth)
    _add_convert_parser(data, common)
    check = data.add_parser("check", parents=[common], help="decode every sample of a dataset and report problems")
    check.add_argument("data_dir")
    check.add_argument("--split", nargs="+", default=None, help="splits to check (default: all)")
    check.set_defaults(func=_cmd_check)

    train = verbs.add_parser("train", parents=[common], help="train one run from a YAML config")
    train.add_argument("config")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.iterations=100 (repeatable)")
    train.add_argument("--masks", default=None, help="train sparse with this mask file (from dsparse prune)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the run's latest checkpoint (iterations, intervals, learning rate and "
                            "schedule may change; an error if there is no checkpoint)")
    resume.add_argument("--resume-or-start", action="store_true",
                        help="continue if the run has a checkpoint, else start it (for job scripts that requeue)")
    train.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="checkpoint and exit after N steps of this invocation")
    train.set_defaults(func=_cmd_train)

    prune = verbs.add_parser("prune", parents=[common],
                             help="compute pruning masks for a run config and write a mask file")
    prune.add_argument("config")
    prune.add_argument("--method", required=True, help="disparse | snip | random | magnitude | lottery")
    prune.add_argument("--sparsity", type=float, required=True, help="fraction of prunable weights to prune")
    prune.add_argument("--criterion", default=None, help="disparse saliency: snip | grad_w2 | magnitude | random")
    prune.add_argument("--from", dest="from_checkpoint", default=None, help="trained run/checkpoint to prune")
    prune.add_argument("--num-batches", type=int, default=None)
    prune.add_argument("--scope", default=None, help="global (default) | layerwise")
    prune.add_argument("--keep-first-dense", action="store_true")
    prune.add_argument("--granularity", default=None, help="element (default) | block | channel")
    prune.add_argument("--budget", default=None, help="what --sparsity removes with --granularity channel: "
                                                      "params (default) | flops (at the training crop)")
    prune.add_argument("--block", type=int, default=None, help="block side for --granularity block: 16 | 32 | 64")
    prune.add_argument("--channel-multiple", type=int, default=None,
                       help="--granularity channel: keep a multiple of this many channels per group (default 8; "
                            "1 = the vote's exact counts)")
    prune.add_argument("--min-density", type=float, default=None,
                       help="the floors: every layer (element masks), block row (block masks) or channel group "
                            "keeps at least this fraction of its weights, blocks or channels, at least one "
                            "(default 0.001, channel groups 0.1; 0 = no floors)")
    prune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    prune.add_argument("--out", default="masks.pt")
    prune.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    prune.set_defaults(func=_cmd_prune)

    evaluate = verbs.add_parser("eval", parents=[common],
                                help="evaluate a checkpoint, optionally against a baseline run")
    evaluate.add_argument("checkpoint", help="run directory or checkpoints/step-N directory")
    evaluate.add_argument("--data", default=None, help="dataset directory (default: the run's)")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--baseline", default=None, help="dense baseline run dir or JSON, adds Delta_T")
    evaluate.add_argument("--max-batches", type=int, default=None)
    evaluate.add_argument("--out", default=None, help="write the metrics as JSON here")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    evaluate.set_defaults(func=_cmd_eval)

    export = verbs.add_parser("export", parents=[common],
                              help="write a sparse run's kept blocks or weights as a compact model file")
    export.add_argument("run", help="run directory or checkpoints/step-N directory of a sparse run")
    export.add_argument("--out", required=True, help="the file to write (eval it with dsparse eval FILE)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    export.add_argument("--format", choices=("torch", "onnx"), default="torch",
                        help="torch: dsparse's compact file (kept blocks/weights); onnx: a dense graph any runtime "
                             "runs, checked in ONNX Runtime")
    export.add_argument("--tasks", default=None, help="keep only these tasks (comma-separated): their heads and "
                                                      "the trunk channels they use")
    export.add_argument("--no-revote", action="store_true",
                        help="with --tasks on a channel run: keep the shared channels only dropped tasks voted for "
                             "(the kept tasks' outputs stay exactly as they were)")
    export.set_defaults(func=_cmd_export)

    sweep = verbs.add_parser("sweep", parents=[common], help="run a sweep spec with Ray Tune (local Ray by default)")
    sweep.add_argument("spec")
    sweep.add_argument("--address", default=None, help="Ray cluster address (auto | ray://host:10001)")
    sweep.add_argument("--out", default=None, help="sweep directory (default runs/sweeps/NAME)")
    sweep.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    sweep.add_argument("--storage", default=None,
                       help="Ray trial state and checkpoints: shared path or bucket URI (default OUT/ray)")
    sweep.set_defaults(func=_cmd_sweep)

    analyze = verbs.add_parser("analyze", parents=[common],
                               help="per-task mask IoU per layer, the watershed, density; optionally a branched "
                                    "model config")
    analyze.add_argument("source", help="mask file (dsparse prune --out), run directory or checkpoint")
    analyze.add_argument("--out", default=None, help="output directory (default RUN/analysis or MASKFILE-analysis)")
    analyze.add_argument("--branch", action="store_true",
                         help="also write branched.yaml: the trunk shared up to the watershed stage, a copy of the "
                              "later stages per task group")
    analyze.add_argument("--groups", type=int, default=None,
                         help="task groups (branches) for --branch, clustered by IoU after the watershed "
                              "(default: one per task)")
    analyze.add_argument("--same-params", action="store_true",
                         help="with --branch: lower the trunk width until the branched model is no larger")
    analyze.add_argument("--overwrite", action="store_true",
                         help="replace the files of an earlier analysis in the output directory")
    analyze.add_argument("--config", default=None, help="with --branch on a mask file: the run config it was made for")
    analyze.set_defaults(func=_cmd_analyze)

    report = verbs.add_parser("report", parents=[common],
                              help="paper-style table of finished runs: methods x task metrics, sparsity, Delta_T, "
                                   "seeds aggregated")
    report.add_argument("runs", nargs="*", help="run directories (or their summary.json)")
    report.add_argument("--sweep", default=None, help="a sweep directory (dsparse sweep --out)")
    report.add_argument("--experiment", default=None, help="an MLflow experiment name")
    report.add_argument("--tracking-uri", default=None, help="MLflow store for --experiment (default as training)")
    report.add_argument("--out", default=None, help="also write OUT.md, OUT.csv, OUT.tex and OUT.png")
    report.add_argument("--overwrite", action="store_true", help="replace existing OUT.* files")
    report.add_argument("--baseline", action="append", default=[], metavar="RUN",
                        help="dense run every row's Delta_T is against, by seed (repeat per seed), e.g. to compare "
                             "architectures against one reference")
    report.add_argument("--delta-t", choices=("standard", "per-task-sum"), default="standard",
                        help="how a task's metric changes combine: their mean (standard) or their sum (AdapMTL's "
                             "tables, to set published numbers beside yours)")
    report.add_argument("--no-constant", action="store_true", help="leave out the constant-predictor row (it reads "
                        "the dataset)")
    report.set_defaults(func=_cmd_report)

    demo = verbs.add_parser("demo", parents=[common],
                            help="synthetic data -> train tiny model on 5 tasks -> eval table")
    demo.add_argument("--workdir", default=".")
    demo.add_argument("--iterations", type=int, default=None, help="override the preset's iterations")
    demo.add_argument("--num-train", type=int, default=4000)
    demo.set_defaults(func=_cmd_demo)
    return parser


def _fail(args, error: Exception, code: int) -> int:
    if args.debug:
        import traceback

        traceback.print_exc()
        print(getattr(error, "worker_traceback", ""), file=sys.stderr)
    print(f"dsparse: error: {error}", file=sys.stderr)
    if args.json and _is_rank_zero():
        print(json.dumps({"error": str(error), "exit_code": code}))
    return code


def main(argv: list[str] | None = None) -> int:
    if "torch" not in sys.modules:  # OpenMP reads its wait policy once, when torch loads it
        from dsparse.cpus import set_openmp_wait_policy

        set_openmp_wait_policy()
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    args.exit_code = 0
    try:
        result = args.func(args)
    except ValueError as error:  # user errors: say what and how to fix, no traceback (unless --debug)
        return _fail(args, error, 2)
    except RuntimeError as error:
        from dsparse.sweep.runner import SweepFailedError
        from dsparse.train.trainer import NonFiniteLossError

        if not isinstance(error, (SweepFailedError, NonFiniteLossError)):
            raise
        return _fail(args, error, 1)  # the message says what to do
    if args.json and _is_rank_zero():
        print(json.dumps(result, default=str))
    return args.exit_code


if __name__ == "__main__":
    sys.exit(main())
