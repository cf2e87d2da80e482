"""`anchorrt eval pope|chair|mme`: hallucination benchmarks through the exported runtime (or the PyTorch reference).

    anchorrt eval pope out/demo -q pope/world_pope_adversarial.json --image-root pope/images
    anchorrt eval pope out/demo -q ... --mitigation clva --set clva.alpha=14 --set clva.tau=2
    anchorrt eval pope out/demo -q ... --backend torch --model samples/demo-llava     # the PyTorch reference
    anchorrt eval chair out/demo --instances instances.json --captions captions.json --synonyms synonyms.txt \
        --image-root images
    anchorrt eval mme out/demo --root mme
    anchorrt eval score pope answers.jsonl -q coco_pope_adversarial.json     # any model's answers, official rules
    anchorrt eval score chair captions.json --instances ... --captions ...  [--chair-impl opera|rohrbach]
    anchorrt eval score mme results_dir/                                      # the eval tool's {subset}.txt files

Each question set keeps a resumable answers file (`<set>.answers.jsonl`) in `--out`; its header records every
input (artifact hashes, backend, device, mitigation, decoding, prompts, the questions' content and image paths):
an existing `--out` made with other inputs is refused with one line naming them (`--overwrite` starts over).
The metrics go to `results.json` (written atomically) and a markdown table to `results.md` and stdout; the
answers also go out in the official scripts' formats (POPE `<set>.pope_answers.jsonl`, MME `mme_results/`,
CHAIR `captions.chair.json`). Nothing is downloaded.
Greedy decoding throughout. The ONNX backend needs no torch; `--backend torch` runs
`anchorrt.exporter.reference.ReferenceLlava` on the checkpoint, with the artifact's tokenizer, prompt template and
preprocessing, so that the two backends differ only in the model computation.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from anchorrt import __version__
from anchorrt.cli_common import friendly as _friendly
from anchorrt.runtime.errors import FlagError

CHAIR_PROMPT = "Please describe this image in detail."
CHAIR_IMPL_OPTION = click.option(
    "--chair-impl", type=click.Choice(["opera", "rohrbach"]), default="opera", show_default=True,
    help="Which official CHAIR code to reproduce. opera (default): the Python-3 copy in OPERA's chair.py that VCD, "
         "OPERA and most hallucination-mitigation papers report with (nltk POS tags + WordNet lemmas, 'train track' "
         "double word, recall). rohrbach: the paper's own code (LisaAnne/Hallucination utils/chair.py, pattern's "
         "singularize). Scoring only: the answers are the same.")
DEVICES = ("cpu", "cuda")


def _say(msg: str) -> None:
    click.echo(msg, err=True)


@click.group("eval")
def eval_group() -> None:
    """Hallucination benchmarks (POPE, CHAIR, MME) on files you point at."""


def parse_mitigation(methods: str | None, overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`--mitigation clva,sevi` and `--set clva.alpha=14` -> {"clva": {"alpha": 14}, "sevi": {}}."""
    names = [m.strip() for m in (methods or "").split(",") if m.strip() and m.strip().lower() != "none"]
    out: dict[str, dict[str, Any]] = {m: {} for m in names}
    for item in overrides:
        key, eq, raw = item.partition("=")
        method, dot, param = key.strip().partition(".")
        if not eq or not dot or not method or not param:
            raise click.UsageError(f"--set {item!r}: expected METHOD.PARAM=VALUE, e.g. clva.alpha=14")
        if method not in out:
            raise click.UsageError(f"--set {item!r} names '{method}', which --mitigation does not enable")
        out[method][param] = _parse_value(raw.strip())
    return out


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    if "," in raw:
        return [_parse_value(p.strip()) for p in raw.split(",")]
    return raw


def _tag(mitigation: Mapping, backend: str) -> str:
    tag = "+".join(mitigation) or "baseline"
    if any(mitigation.values()):
        tag += "-" + hashlib.sha256(json.dumps(mitigation, sort_keys=True).encode()).hexdigest()[:8]
    return tag + ("-torch" if backend == "torch" else "")


def _common(fn: Callable) -> Callable:
    options = [
        click.argument("artifact_dir", type=click.Path(path_type=Path)),
        click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
                     help="Results folder (default out/eval/<benchmark>-<artifact>-<mitigation>)."),
        click.option("--limit", type=int, default=None, help="Answer only the first N questions of each set."),
        click.option("--batch-size", default=16, show_default=True, type=int),
        click.option("--mitigation", default=None, help="Methods to enable, comma-separated (e.g. clva,sevi)."),
        click.option("--set", "overrides", multiple=True, metavar="METHOD.PARAM=VALUE",
                     help="A mitigation parameter, e.g. clva.alpha=14 (repeatable)."),
        click.option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
                     help="onnx: the exported runtime; torch: the PyTorch reference of --model."),
        click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
                     help="The Hugging Face checkpoint folder (for --backend torch)."),
        click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True),
        click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the artifact files."),
        click.option("--progress/--no-progress", default=True, show_default=True),
        click.option("--overwrite", is_flag=True,
                     help="Discard answers already in --out (made with other inputs) and start over."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


class _Run:
    """What every benchmark command shares: the model behind `answer`, settings, the output folder."""

    def __init__(self, benchmark: str, artifact_dir: Path, out_dir: Path | None, batch_size: int, mitigation: str,
                 overrides, backend: str, model_dir: Path | None, device: str, no_verify: bool, progress: bool,
                 max_new_tokens: int, overwrite: bool = False):
        from anchorrt.runtime.manifest import Manifest

        self.benchmark, self.backend, self.progress, self.overwrite = benchmark, backend, progress, overwrite
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.mitigation = parse_mitigation(mitigation, overrides)
        if backend == "torch" and model_dir is None:
            raise click.UsageError("--backend torch needs --model MODEL_DIR (the checkpoint the artifact came from)")
        self.manifest = Manifest.load(artifact_dir, verify=not no_verify)
        self.out = out_dir or Path("out/eval") / f"{benchmark}-{artifact_dir.name}-{_tag(self.mitigation, backend)}"
        decoder = self.manifest.graph("decoder")["file"]
        self.settings = {
            "benchmark": benchmark, "artifact": str(artifact_dir.resolve()),
            "decoder_sha256": self.manifest.data.get("files", {}).get(decoder),
            "artifact_files": self.manifest.data.get("files", {}), "backend": backend, "device": device,
            "model": str(model_dir.resolve()) if model_dir else None, "mitigation": self.mitigation,
            "max_new_tokens": max_new_tokens, "decoding": "greedy",
        }
        self.answer = self._torch(model_dir) if backend == "torch" else self._onnx(artifact_dir, device, no_verify)
        self.t0 = time.perf_counter()

    def _onnx(self, artifact_dir: Path, device: str, no_verify: bool):
        from anchorrt.cli import PROVIDERS
        from anchorrt.runtime.eval.harness import pipeline_answerer
        from anchorrt.runtime.pipeline import Pipeline

        pipe = Pipeline(self.manifest, providers=PROVIDERS[device])
        return pipeline_answerer(pipe, self.max_new_tokens, self.mitigation)

    def _torch(self, model_dir: Path):
        return TorchAnswerer(model_dir, self.manifest, self.max_new_tokens, self.mitigation)

    def answers(self, name: str, items, limit: int | None, extra: Mapping | None = None) -> list[dict]:
        from anchorrt.runtime.eval.harness import run_items

        settings = dict(self.settings, set=name, items_sha256=items_fingerprint(items), **(extra or {}))
        return run_items(items, self.answer, self.out / f"{name}.answers.jsonl", settings,
                         batch_size=self.batch_size, limit=limit, progress=self.progress, desc=name,
                         overwrite=self.overwrite)

    def write(self, relative: str, text: str) -> None:
        from anchorrt.runtime.eval.harness import write_atomic

        write_atomic(self.out / relative, text)

    def finish(self, results: dict, table: str) -> None:
        from anchorrt.runtime.eval.harness import write_atomic

        doc = {"benchmark": self.benchmark, "settings": self.settings, "results": results,
               "wall_seconds": round(time.perf_counter() - self.t0, 1), "anchorrt": __version__}
        title = f"{self.benchmark.upper()} - {Path(self.settings['artifact']).name}, {self.backend}, " \
                f"mitigation {json.dumps(self.mitigation) if self.mitigation else 'off'}"
        write_atomic(self.out / "results.json", json.dumps(doc, indent=2) + "\n")
        write_atomic(self.out / "results.md", f"### {title}\n\n{table}")
        click.echo(f"{title}\n\n{table}")
        _say(f"wrote {self.out / 'results.json'} and results.md")


def items_fingerprint(items) -> str:
    """sha256 of every item's id, image path, prompt and label (all items, before --limit): another questions
    file, --image-root, prompt or sample gives another fingerprint."""
    doc = [[it.id, str(Path(it.image).resolve()), it.prompt, it.label] for it in items]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()


def reference_flags(mitigation: Mapping, baked: Mapping) -> tuple[dict | None, dict | None]:
    """Runtime-style flags ({"clva": {"alpha": 14}, "sevi": True}) -> the reference's `clva`, `sevi` settings, with
    the artifact's baked defaults and layer choices where the method is baked (else METHODS.md's defaults), so
    that both backends compute the same thing."""
    from anchorrt.runtime.mitigation import ALIASES, PARAMS, check_value

    out: dict[str, dict | None] = {"clva": None, "sevi": None}
    for method, setting in mitigation.items():
        if method not in out:
            raise FlagError(f"the PyTorch reference implements clva and sevi only, not {method}")
        if setting is None or setting is False:
            continue
        record = baked.get(method) or {}
        values = {k: float(record.get("parameters", {}).get(k, {}).get("default", p.default))
                  for k, p in PARAMS[method].items()}
        for key, value in ({} if setting is True else dict(setting)).items():
            key = ALIASES[method].get(key, key)
            if key not in PARAMS[method]:
                raise FlagError(f"unknown {method} parameter {key!r}; known: {', '.join(PARAMS[method])}")
            values[key] = check_value(method, key, value)
        layers = record.get("layers", {})
        if method == "clva":
            ref = {"alpha": values["alpha"], "beta": values["beta"], "tau": values["tau"], "lam": values["lambda"]}
            ref.update({k: layers[k] for k in ("l_neg", "l_pos", "drift_layers") if k in layers})
        else:
            ref = {"omega": values["omega"], "kappa": values["kappa"]}
            if "start_layer" in layers:
                ref["start_layer"] = layers["start_layer"]
        out[method] = ref
    return out["clva"], out["sevi"]


class TorchAnswerer:
    """Greedy answers from `anchorrt.exporter.reference.ReferenceLlava`, fed exactly what the runtime feeds its graphs."""

    def __init__(self, model_dir: Path, manifest, max_new_tokens: int, mitigation: Mapping):
        from anchorrt.exporter.checkpoint import inspect_checkpoint
        from anchorrt.exporter.reference import ReferenceLlava
        from anchorrt.runtime.preprocess import ImagePreprocessor
        from anchorrt.runtime.prompt import PromptBuilder

        inspect_checkpoint(model_dir)
        self.ref = ReferenceLlava.from_pretrained(model_dir)
        self.prompts = PromptBuilder(manifest.folder / manifest.data["tokenizer"]["file"], manifest)
        self.preprocess = ImagePreprocessor(manifest.preprocessing)
        self.eos = [int(t) for t in manifest.tokens["eos_token_ids"]]
        self.pad = int(manifest.tokens["pad_token_id"])
        self.max_new_tokens = max_new_tokens
        self.clva, self.sevi = reference_flags(mitigation, manifest.mitigation)

    def __call__(self, items) -> list[str]:
        import numpy as np
        import torch

        from anchorrt.runtime.preprocess import load_image

        encoded = [self.prompts.encode(it.prompt, reserve=self.max_new_tokens) for it in items]
        width = max(len(e.ids) for e in encoded)
        ids = np.full((len(items), width), self.pad, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for i, e in enumerate(encoded):  # left padding, as the runtime pads
            ids[i, width - len(e.ids):], mask[i, width - len(e.ids):] = e.ids, 1
        pixels = torch.from_numpy(self.preprocess([load_image(str(it.image)) for it in items]))
        new = self.ref.generate(torch.from_numpy(ids), pixels, torch.from_numpy(mask), self.max_new_tokens,
                                clva=self.clva, sevi=self.sevi, eos_token_id=self.eos)
        texts = []
        for row in new.tolist():
            cut = next((k for k, t in enumerate(row) if t in self.eos), len(row))
            texts.append(self.prompts.decode(row[:cut]))
        return texts


# ------------------------------------------------------------------------------------------------ commands

@eval_group.command("pope")
@_common
@click.option("-q", "--questions", multiple=True, required=True, type=click.Path(path_type=Path),
              help="A POPE file (JSON lines); repeat for several splits, each reported under its file name.")
@click.option("--image-root", required=True, type=click.Path(path_type=Path), help="Folder of the images.")
@click.option("--prompt-suffix", default="", help="Text appended to every question (e.g. ' Answer yes or no.').")
@click.option("--max-new-tokens", default=8, show_default=True, type=int)
@_friendly
def pope(artifact_dir, out_dir, limit, batch_size, mitigation, overrides, backend, model_dir, device, no_verify,
         progress, overwrite, questions, image_root, prompt_suffix, max_new_tokens) -> None:
    """POPE: yes/no object existence (accuracy, precision, recall, F1, yes-ratio, FP rate per split)."""
    from anchorrt.runtime.eval.formats import pope_answer_lines
    from anchorrt.runtime.eval.harness import file_fingerprint, pope_report
    from anchorrt.runtime.eval.loaders import load_pope

    run = _Run("pope", artifact_dir, out_dir, batch_size, mitigation, overrides, backend, model_dir, device,
               no_verify, progress, max_new_tokens, overwrite)
    names = [q.stem for q in questions]
    if len(set(names)) != len(names):
        raise click.UsageError("two --questions files have the same name; their answers files would collide")
    records = {}
    for path, name in zip(questions, names):
        items = load_pope(path, image_root)
        for it in items:
            it.prompt += prompt_suffix
        records[name] = run.answers(name, items, limit, {"file": file_fingerprint(path), "prompt_suffix": prompt_suffix,
                                                         "image_root": str(Path(image_root).resolve())})
    results, table = pope_report(records)
    run.finish(results, table)
    for name, recs in records.items():  # after results.json: the official format, for evaluate.py
        run.write(f"{name}.pope_answers.jsonl", pope_answer_lines(recs))


@eval_group.command("chair")
@_common
@click.option("--instances", required=True, type=click.Path(path_type=Path), help="COCO instances_*.json.")
@click.option("--captions", required=True, type=click.Path(path_type=Path), help="COCO captions_*.json.")
@click.option("--synonyms", default=None, type=click.Path(path_type=Path),
              help="Synonym table, one line per category 'category, synonym, ...' (default: the official COCO "
                   "table of the CHAIR code).")
@click.option("--image-root", required=True, type=click.Path(path_type=Path), help="Folder of the images.")
@click.option("--sample", type=int, default=None, help="Caption this many images drawn at random (protocol: 500).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --sample.")
@click.option("--prompt", default=CHAIR_PROMPT, show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@CHAIR_IMPL_OPTION
@_friendly
def chair(artifact_dir, out_dir, limit, batch_size, mitigation, overrides, backend, model_dir, device, no_verify,
          progress, overwrite, instances, captions, synonyms, image_root, sample, seed, prompt, max_new_tokens,
          chair_impl) -> None:
    """CHAIR: object hallucination in free captions (CHAIR_s, CHAIR_i, recall)."""
    from anchorrt.runtime.eval.formats import chair_caption_doc
    from anchorrt.runtime.eval.harness import chair_report
    from anchorrt.runtime.eval.loaders import load_chair

    data = load_chair(instances, captions, synonyms, image_root, prompt, sample=sample, seed=seed, impl=chair_impl)
    run = _Run("chair", artifact_dir, out_dir, batch_size, mitigation, overrides, backend, model_dir, device,
               no_verify, progress, max_new_tokens, overwrite)
    records = run.answers("captions", data.items, limit, {"image_root": str(Path(image_root).resolve()),
                                                          "prompt": prompt, "sample": sample, "seed": seed})
    results, table = chair_report(records, data.ground_truth(), data.chair)
    run.finish(results, table)
    run.write("captions.chair.json", chair_caption_doc(records))  # OPERA chair.py's --cap_file


@eval_group.command("mme")
@_common
@click.option("--root", required=True, type=click.Path(path_type=Path),
              help="MME folder: <subset>/ folders, or the eval tool's <subset>.txt files.")
@click.option("--subset", "subsets", multiple=True, help="Subsets to run (default: every official subset present, "
              "of the 14: existence count position color posters celebrity scene landmark artwork OCR "
              "commonsense_reasoning numerical_calculation text_translation code_reasoning).")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Images for <subset>.txt files (default: --root).")
@click.option("--max-new-tokens", default=8, show_default=True, type=int)
@_friendly
def mme(artifact_dir, out_dir, limit, batch_size, mitigation, overrides, backend, model_dir, device, no_verify,
        progress, overwrite, root, subsets, image_root, max_new_tokens) -> None:
    """MME: acc, acc+ and score = 100*acc + 100*acc+ per subset, as the official calculation.py scores them; the
    hallucination sum (existence, count, position, color) and the perception / cognition totals."""
    from anchorrt.runtime.eval.harness import mme_report
    from anchorrt.runtime.eval.loaders import load_mme
    from anchorrt.runtime.eval.mme import SUBSETS, result_lines

    if not subsets:
        subsets = [s for s in SUBSETS if (root / s).is_dir() or (root / f"{s}.txt").is_file()]
        if not subsets:
            raise click.UsageError(f"no MME subset ({', '.join(SUBSETS[:4])}, ...) found under '{root}'")
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise click.UsageError(f"--subset {unknown[0]!r} is not an MME subset; choose from {', '.join(SUBSETS)}")
    run = _Run("mme", artifact_dir, out_dir, batch_size, mitigation, overrides, backend, model_dir, device,
               no_verify, progress, max_new_tokens, overwrite)
    records = []
    for subset in subsets:
        items = load_mme(root, [subset], image_root)
        records += run.answers(subset, items, limit, {"root": str(Path(root).resolve()),
                                                      "image_root": str(Path(image_root or root).resolve())})
    results, table = mme_report(records)
    run.finish(results, table)
    for subset, text in result_lines(records).items():  # the eval tool's calculation.py input
        run.write(f"mme_results/{subset}.txt", text)


# ------------------------------------------------------------------------------------------------ eval score

@eval_group.group("score")
def score_group() -> None:
    """Score an existing answers file (from any model or toolkit) with the official rules; no model is run."""


def _score_out(results: dict, table: str, title: str, json_out: Path | None) -> None:
    from anchorrt.runtime.eval.harness import write_atomic

    if json_out is not None:
        write_atomic(json_out, json.dumps({"results": results, "anchorrt": __version__}, indent=2) + "\n")
        _say(f"wrote {json_out}")
    click.echo(f"{title}\n\n{table}")


JSON_OUT_OPTION = click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
                               help="Also write the metrics to this JSON file.")


@score_group.command("pope")
@click.argument("answers", type=click.Path(path_type=Path))
@click.option("-q", "--questions", required=True, type=click.Path(path_type=Path),
              help="The POPE question file the answers are for (JSON lines or a JSON array; its labels are used).")
@JSON_OUT_OPTION
@_friendly
def score_pope(answers, questions, json_out) -> None:
    """POPE as evaluate.py scores it: the i-th answer ('answer', else 'text') against the i-th question's label."""
    from anchorrt.runtime.eval.formats import pair_pope, read_pope_answers
    from anchorrt.runtime.eval.harness import pope_report
    from anchorrt.runtime.eval.loaders import load_pope

    items = load_pope(questions, ".")
    records = pair_pope(read_pope_answers(answers), items, str(answers))
    results, table = pope_report({Path(questions).stem: records})
    _score_out(results, table, f"POPE - {answers}", json_out)


@score_group.command("chair")
@click.argument("answers", type=click.Path(path_type=Path))
@click.option("--instances", required=True, multiple=True, type=click.Path(path_type=Path),
              help="COCO instances_*.json (repeatable: OPERA's script combines train2014 and val2014).")
@click.option("--captions", required=True, multiple=True, type=click.Path(path_type=Path),
              help="COCO captions_*.json (repeatable).")
@click.option("--synonyms", default=None, type=click.Path(path_type=Path),
              help="Synonym table (default: the official COCO table of the CHAIR code).")
@click.option("--image-id-key", default="image_id", show_default=True)
@click.option("--caption-key", default="caption", show_default=True)
@CHAIR_IMPL_OPTION
@JSON_OUT_OPTION
@_friendly
def score_chair(answers, instances, captions, synonyms, image_id_key, caption_key, chair_impl, json_out) -> None:
    """CHAIR_s, CHAIR_i and recall of a captions file (a JSON list or JSON lines of {image_id, caption}, the
    coco-caption imgToEval layout, or an anchorrt answers file) against the COCO annotations."""
    from anchorrt.runtime.eval.formats import read_chair_captions
    from anchorrt.runtime.eval.harness import markdown_table
    from anchorrt.runtime.eval.loaders import coco_ground_truth, make_chair

    caps = read_chair_captions(answers, image_id_key, caption_key)
    chair = make_chair(chair_impl, synonyms)
    objects, _ = coco_ground_truth(instances, captions, chair)
    gt = {str(k): v for k, v in objects.items()}
    unknown = sorted({k for k, _ in caps if k not in gt})
    if unknown:  # the official code scores them with no ground-truth object (its defaultdict); so do we, loudly
        _say(f"warning: {len(unknown)} image id(s) of '{answers}' are in no --instances file (e.g. {unknown[0]}); "
             "scored with no ground-truth object, as the official code does")
    m = chair.score(caps, gt)
    table = markdown_table(["captions", "CHAIR_s", "CHAIR_i", "recall", "object mentions", "implementation"],
                           [(m["n_captions"], m["chair_s"], m["chair_i"], m["recall"], m["mentions"], m["impl"])])
    _score_out(m, table, f"CHAIR - {answers}", json_out)


@score_group.command("mme")
@click.argument("results_dir", type=click.Path(path_type=Path))
@JSON_OUT_OPTION
@_friendly
def score_mme(results_dir, json_out) -> None:
    """MME as calculation.py scores a folder of {subset}.txt files (image, question, ground truth, answer)."""
    from anchorrt.runtime.eval.harness import mme_report
    from anchorrt.runtime.eval.mme import read_results_dir

    records = [{"subset": task, "label": gt, "answer": answer}
               for task, rows in read_results_dir(results_dir).items() for gt, answer in rows]
    results, table = mme_report(records)
    _score_out(results, table, f"MME - {results_dir}", json_out)
