"""Score an editor on toy-world data: python -m jobs.eval_edit --model DIR --data DIR --steps N [--engine K=V]...

Prints one JSON object: PSNR and SSIM against the exact targets per family, per family group and overall (beside
the autoencoder round-trip PSNR of the same targets, the ceiling the model's autoencoder allows), instruction
accuracy (the share of outputs closer to their own target than to the target of any other global instruction on the
same source), and under "behaviour" the behavioural tests made measurable: copy-paste (the identity family against
its source), structure transfer (Sobel edge F1 on recolour edits), controllability (accuracy per family), the
reference family. `--engine section.key=value` overrides the EditorConfig (e.g. `causal=kv`, `training_free=true`,
`dbcache.enabled=true`, `buckets.sizes=[[128,128]]`); the built config, the model's attention mode and the
step-2 reuse stats go in the JSON, and `python -m jobs.eval_table` turns several such JSONs into one table. Writes a
PNG grid (source, reference, target, output) for a person to look at. The model runs through rtedit.Editor, the
same path `serve` uses; no Ray needed.

Beside the data's families: instruction accuracy per wording template ("by_template", family -> template), and
"instructions", a check of single instructions (default: the model's rtedit.json examples, the page's one-click
ones, then toy.NEWCOMER_INSTRUCTIONS) each on --cases toy-world-2 scenes and on whole skimage photos (--photos; a
local edit's shape drawn on the photo), and "drawn": hand-drawn red circles (toy.drawn_probes) with the instructions
a newcomer typed on them. A check is right when the output is nearer its exact target than the source, every global
edit, every local edit it could be mistaken for (the shape in another colour, or removed) and the half-done edit
(halfway between source and target); "instruction_checks" sums them up (its "all_right": every instruction and probe
right on every case).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rtedit.config import EditorConfig
from rtedit.config_parsing import parse_override, set_dotted
from rtedit.editor import Editor
from rtedit.errors import (
    ConfigError,
    InvalidRequest,
    ModelLoadError,
    UnsupportedRequest,
)
from rtedit.images import pixels_to_array, to_pixel_tensor
from rtedit.train import evaluation, toy
from rtedit.train.data import decode_rgb, read_edit_examples
from rtedit.train.tasks.teacher import to_uint8

logger = logging.getLogger("jobs.eval_edit")

# EditorConfig fields with their own flags: an --engine override of them would be a second, conflicting source.
FLAG_FIELDS = {"model": "--model", "device": "--device", "taef2_dir": "--taef2-dir"}


def parse_engine_overrides(items: list[str]) -> dict[str, object]:
    """`section.key=value` strings as {dotted key: value}, values parsed as YAML scalars or lists."""
    overrides: dict[str, object] = {}
    for item in items:
        key, value = parse_override(item, "--engine")
        if key.split(".")[0] in FLAG_FIELDS:
            raise ConfigError(f"--engine {key}: set it with {FLAG_FIELDS[key.split('.')[0]]}")
        overrides[key] = value
    return overrides


def engine_config(model: str, device: str | None, taef2_dir: str | None,
                  overrides: dict[str, object]) -> EditorConfig:
    """The validated EditorConfig of the evaluated editor: the flags, then the dotted overrides."""
    data: dict = {"model": model, "device": device, "taef2_dir": taef2_dir}
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return EditorConfig.from_dict(data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers model folder (with rtedit.json) or preset")
    parser.add_argument("--data", required=True, type=Path, help="toy-world folder (its eval/ split) or a split folder")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per edit")
    parser.add_argument("--split", default="eval", choices=("train", "eval"))
    parser.add_argument("--limit", type=int, default=None, help="score at most this many examples")
    parser.add_argument("--seed", type=int, default=0, help="seed of example i is seed + i")
    parser.add_argument("--device", default=None, help="cpu or cuda; default cuda when present")
    parser.add_argument("--taef2-dir", default=None, help="TAEF2 weights folder; default rtedit.paths.taef2_dir()")
    parser.add_argument("--grid", type=Path, default=Path("eval_grid.png"), help="PNG grid output path")
    parser.add_argument("--grid-per-family", type=int, default=2, help="grid rows per family")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="EditorConfig override, repeatable: causal=kv, training_free=true, dtype=bfloat16, "
                             "dbcache.enabled=true, buckets.sizes=[[128,128]]")
    parser.add_argument("--out", type=Path, default=None, help="also write the result JSON here (for jobs.eval_table)")
    parser.add_argument("--save-outputs", type=Path, default=None,
                        help="write every output (float32 .npy, in example order) for a later --compare-outputs")
    parser.add_argument("--compare-outputs", type=Path, default=None,
                        help="another run's --save-outputs file on the same examples: PSNR of these outputs against it")
    parser.add_argument("--label", default=None, help="row label in jobs.eval_table; default the --model value")
    parser.add_argument("--copy-paste-db", type=float, default=evaluation.COPY_PASTE_THRESHOLD_DB,
                        help="PSNR against the source at or above which an identity edit counts as a copy")
    parser.add_argument("--instruction", action="append", default=None, dest="instructions", metavar="TEXT",
                        help="an instruction to check (repeatable); default the model's rtedit.json examples and "
                             "the newcomer's wordings (rtedit.train.toy.NEWCOMER_INSTRUCTIONS)")
    parser.add_argument("--cases", type=int, default=8, help="toy scenes per checked instruction (0: none)")
    parser.add_argument("--photos", nargs="*", default=list(toy.CHECK_PHOTOS),
                        help="skimage.data photos each checked instruction edits whole (none: skip)")
    parser.add_argument("--no-checks", action="store_true", help="skip the instruction, photo and drawn checks")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.cases < 0:
        parser.error(f"--cases must be >= 0, got {args.cases}")
    unknown = [p for p in args.photos if p not in toy.TRAIN_PHOTOS + toy.EVAL_PHOTOS]
    if unknown:
        parser.error(f"--photos must name toy photos ({toy.TRAIN_PHOTOS + toy.EVAL_PHOTOS}), got {unknown}")
    try:
        args.engine_overrides = parse_engine_overrides(args.engine)
        args.engine_config = engine_config(args.model, args.device, args.taef2_dir, args.engine_overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    args.label = args.label or str(args.model)
    return args


@torch.inference_mode()
def taef2_round_trip(editor: Editor, target: np.ndarray) -> np.ndarray:
    """The target through the editor's own autoencoder and back: what a perfect latent would decode to."""
    pixels = to_pixel_tensor(target, editor.codec.device, editor.codec.dtype)
    return pixels_to_array(editor.codec.decode(editor.codec.encode(pixels)))


def compare_outputs(outputs: list[np.ndarray], path: Path) -> dict:
    """PSNR of these outputs against a saved run's on the same examples: over all pixels, and per example."""
    saved = np.load(path)
    if saved.shape != (len(outputs), *outputs[0].shape):
        raise SystemExit(f"eval_edit: {path} holds outputs of shape {saved.shape}, this run has {len(outputs)} of "
                         f"{outputs[0].shape}: not the same examples")
    ours = np.stack(outputs).astype(np.float64)
    per_example = [evaluation.psnr(o, r) for o, r in zip(ours, saved.astype(np.float64))]
    return {"file": str(path), "psnr_all_pixels": evaluation.psnr(ours, saved),
            "psnr_mean": float(np.mean(per_example)), "psnr_min": float(np.min(per_example)), "n": len(outputs)}


def checked_instructions(args: argparse.Namespace, editor: Editor) -> list[str]:
    """--instruction's, else the model's rtedit.json examples and then the newcomer's wordings, each once."""
    if args.instructions:
        return list(dict.fromkeys(args.instructions))
    examples = list(editor.bundle.sidecar.examples or ())
    return list(dict.fromkeys(examples + list(toy.NEWCOMER_INSTRUCTIONS)))


def _rate(rows: list[dict]) -> dict:
    if not rows:
        return {"n": 0, "accuracy": None, "psnr": None}
    return {"n": len(rows), "accuracy": float(np.mean([r["right"] for r in rows])),
            "psnr": float(np.mean([r["psnr"] for r in rows]))}


def instruction_checks(editor: Editor, args: argparse.Namespace, grid_rows: list) -> dict:
    """The single-instruction checks (module docstring): per instruction on toy scenes and whole photos, and the
    drawn probes; every output scored against its exact target and the edits it could be mistaken for."""
    def check(source: np.ndarray, target: np.ndarray, instruction: str, local: list[np.ndarray], seed: int) -> dict:
        output = editor.edit(source, instruction, steps=args.steps, seed=seed).array
        own = target.astype(np.float32) / 255.0
        # The half-done edit too (halfway from the source to the target): "make it grayscale" half-desaturating a
        # photo is nearer the grayscale target than any other edit, but not right.
        half = (source.astype(np.float32) + target.astype(np.float32)) / 510.0
        alternatives = (evaluation.alternative_targets(source, target) + [a.astype(np.float32) / 255.0 for a in local]
                        + ([half] if not np.array_equal(source, target) else []))
        if len(grid_rows) < 64 and seed % 5 == 0:
            grid_rows.append([source, np.full_like(source, 255), target, to_uint8(output)])
        return {"right": bool(evaluation.closest_to_own(output, own, alternatives)),
                "psnr": evaluation.psnr(output, own)}

    results, wrong, seed = {}, [], args.seed
    photos = {name: toy.whole_photo(name) for name in args.photos}
    for text in checked_instructions(args, editor):
        parsed = toy.parse_instruction(text)
        if parsed is None or parsed[0] in toy.REFERENCE_FAMILIES:
            results[text] = {"family": parsed[0] if parsed else None, "template": parsed[1] if parsed else None,
                             "skipped": "not a reference-free toy-world wording"}
            continue
        family, template, attributes = parsed
        toy_rows, photo_rows = [], {}
        for index in range(args.cases):
            case = toy.instruction_case(family, attributes, index, instruction=text)
            row = check(case.source, case.target, text, toy.case_alternatives(family, attributes, index), seed)
            seed += 1
            toy_rows.append(row)
            if not row["right"]:
                wrong.append(f"{text!r} on toy case {index}")
        for name, photo in photos.items():
            case = toy.instruction_case(family, attributes, 0, backdrop=photo, instruction=text)
            row = check(case.source, case.target, text,
                        toy.case_alternatives(family, attributes, 0, backdrop=photo), seed)
            seed += 1
            photo_rows[name] = row
            if not row["right"]:
                wrong.append(f"{text!r} on photo {name}")
        every = toy_rows + list(photo_rows.values())
        results[text] = {"family": family, "template": template, "accuracy": _rate(every)["accuracy"],
                         "toy": _rate(toy_rows), "photos": {**_rate(list(photo_rows.values())),
                                                            "right": {k: v["right"] for k, v in photo_rows.items()}}}
    drawn: dict[str, dict] = {}
    for name, probe in toy.drawn_probes().items():
        drawn[name] = {}
        for text in toy.PROBE_INSTRUCTIONS:
            family, _, attributes = toy.parse_instruction(text)
            row = check(probe, toy.probe_target(probe, family, attributes), text,
                        toy.probe_alternatives(probe, family, attributes), seed)
            seed += 1
            drawn[name][text] = row
            if not row["right"]:
                wrong.append(f"{text!r} on the {name}")
    rows = [v for v in results.values() if v.get("accuracy") is not None]
    n_checks = sum(v["toy"]["n"] + v["photos"]["n"] for v in rows) + sum(len(d) for d in drawn.values())
    return {"instructions": results, "drawn": drawn,
            "instruction_checks": {"n": n_checks, "wrong": wrong, "all_right": not wrong and n_checks > 0,
                                   "accuracy": (1.0 - len(wrong) / n_checks) if n_checks else None,
                                   "min_instruction_accuracy": min((v["accuracy"] for v in rows), default=None),
                                   "cases": args.cases, "photos": list(args.photos)}}


def by_template(rows: list[tuple[str, str | None, dict]]) -> dict:
    """Instruction accuracy and PSNR per family and wording template of the scored data examples."""
    out: dict[str, dict[str, dict]] = {}
    for family, template, values in rows:
        entry = out.setdefault(family, {}).setdefault(template or "(unknown wording)", {"n": 0, "acc": [], "psnr": []})
        entry["n"] += 1
        entry["acc"].append(values["instruction_accuracy"])
        entry["psnr"].append(values["psnr"])
    return {family: {t: {"n": e["n"], "instruction_accuracy": float(np.mean(e["acc"])),
                         "psnr": float(np.mean(e["psnr"]))} for t, e in sorted(templates.items())}
            for family, templates in sorted(out.items())}


def evaluate(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    folder = args.data / args.split if (args.data / args.split).is_dir() else args.data
    examples, report = read_edit_examples(folder, split=args.split)
    if args.limit is not None:
        examples = examples[: args.limit]
    if not examples:
        raise SystemExit(f"no valid {args.split} examples under {folder}: {report.as_dict()}")
    try:
        editor = Editor.from_config(args.engine_config)
    except (ConfigError, ModelLoadError, UnsupportedRequest) as exc:  # e.g. a causal mode the folder was not made for
        raise SystemExit(f"eval_edit: cannot build the editor for {args.model}: {exc}") from exc
    scores, combinations = evaluation.Scores(), evaluation.Scores()
    source_psnrs, edge_f1s, edit_seconds, outputs = [], [], [], []
    grid_rows, per_family, template_rows = [], {}, []
    for i, example in enumerate(examples):
        source, target = decode_rgb(example.source), decode_rgb(example.target)
        edit_start = time.perf_counter()
        try:
            result = editor.edit(example.source, example.instruction, references=list(example.references),
                                 steps=args.steps, seed=args.seed + i)
        except InvalidRequest as exc:  # the config cannot serve this example (a bucket's reference counts, steps)
            raise SystemExit(f"eval_edit: example {example.id} ({example.family}) is refused: {exc}") from exc
        edit_seconds.append(time.perf_counter() - edit_start)
        output, own = result.array, target.astype(np.float32) / 255.0
        if args.save_outputs is not None or args.compare_outputs is not None:
            outputs.append(output)
        if output.shape != own.shape:
            raise SystemExit(f"eval_edit: the editor returned {output.shape[:2]} for a {own.shape[:2]} target; "
                             f"its buckets resize the frame (use --engine buckets.sizes=[[{own.shape[0]},"
                             f"{own.shape[1]}]])")
        if example.family == evaluation.COPY_PASTE_FAMILY:
            source_psnrs.append(evaluation.psnr(output, source.astype(np.float32) / 255.0))
        if example.family == evaluation.STRUCTURE_FAMILY:
            edge_f1s.append(evaluation.edge_f1(output, own))
        alternatives = evaluation.alternative_targets(source, target)
        values = {"psnr": evaluation.psnr(output, own), "ssim": evaluation.ssim(output, own),
                  "taef2_psnr": evaluation.psnr(taef2_round_trip(editor, target), own),
                  "instruction_accuracy": float(evaluation.closest_to_own(output, own, alternatives))}
        scores.add(example.family, **values)
        template_rows.append((example.family, toy.template_of(example.family, example.instruction,
                                                              example.attributes), values))
        if example.family in toy.LOCAL_FAMILIES:  # generalisation: (family, attribute) combinations never trained on
            held_out = toy.is_held_out(example.family, example.attributes)
            combinations.add(f"{example.family}, {'held-out' if held_out else 'seen'} combination", **values)
        if per_family.get(example.family, 0) < args.grid_per_family:
            per_family[example.family] = per_family.get(example.family, 0) + 1
            reference = decode_rgb(example.references[0]) if example.references else np.full_like(source, 255)
            grid_rows.append([source, reference, target, to_uint8(output)])
    checks = {} if args.no_checks else instruction_checks(editor, args, grid_rows)
    grid = evaluation.save_grid(grid_rows, args.grid)
    summary = scores.summary()
    if args.save_outputs is not None:
        args.save_outputs.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_outputs, np.stack(outputs).astype(np.float32))
    model_info = editor.model_info
    return {"label": args.label, "model": str(args.model), "data": str(folder), "steps": args.steps,
            "n": len(examples), "bad_rows": report.num_bad, **summary,
            "local_combinations": combinations.summary()["families"],
            "by_template": by_template(template_rows), **checks,
            "behaviour": evaluation.behaviour(summary, source_psnrs, edge_f1s, args.copy_paste_db),
            "engine_overrides": args.engine_overrides, "engine": args.engine_config.to_dict(),
            "causal": model_info.get("causal"), "model_info": model_info,
            # Step-2 reuse stats exist only where the editor runs a reuse policy (the session mode's DBCache).
            "step_reuse": editor.stats().get("step_reuse"),
            "outputs_vs_saved": compare_outputs(outputs, args.compare_outputs) if args.compare_outputs else None,
            "grid": str(grid), "seconds": round(time.perf_counter() - start, 1),
            "seconds_per_edit": round(float(np.mean(edit_seconds)), 4), "device": str(editor.device)}


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    result = evaluate(args)
    text = json.dumps(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
