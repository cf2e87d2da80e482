"""The demo model's hallucination table: baseline vs each mitigation, POPE x 3 splits, MME, CHAIR, then the sweep.

    python scripts/eval_demo.py                       # everything (about 30-60 min on 2 CPU cores)
    python scripts/eval_demo.py --limit 300 --no-sweep  # a quick look

Every figure comes from `anchorrt eval` (the exported runtime, fp32, greedy) on the sets of
`scripts/make_eval_sets.py` (seed 1); answers are resumable, so a second run only fills gaps. What it does:
1. exports `--model` once and bakes copies: CLVA (METHODS.md's layers for 8 layers: l_neg 0, l_pos 2, drift 3-7),
   the IAVA probe, and SEVI with start_layer 2 / 4 / 6. METHODS.md's SEVI default (start_layer 8, literal) leaves an
   8-layer model unchanged, so that row would be the baseline by construction and `bake` refuses it;
2. exports `--visalign` (a VisAlign checkpoint of the same model) when given;
3. runs baseline, CLVA, SEVI, CLVA+SEVI, IAVA, VisAlign on every set, and the PyTorch reference
   (`--backend torch`) for CLVA on the adversarial split;
4. the sweep of the run-time knobs METHODS.md exposes (CLVA alpha/beta/tau/lambda, SEVI omega/kappa and the
   export-time start layer, IAVA alpha/i/lambda) on the adversarial split and MME position;
5. writes `WORK/table.md` and `WORK/table.json` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("random", "popular", "adversarial")
MME_SUBSETS = ("existence", "color", "position")


class Runner:
    def __init__(self, args):
        self.args = args
        self.work: Path = args.work
        self.sets: Path = args.sets
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))

    def cli(self, *argv: str) -> None:
        cmd = [sys.executable, "-m", "anchorrt", *argv]
        done = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(argv[:3])} failed: {done.stderr.strip().splitlines()[-1:]}")

    # -- artifacts ------------------------------------------------------------------------------------------
    def artifacts(self) -> dict[str, Path]:
        arts = {}
        plain = self.work / "art-plain"
        if not (plain / "manifest.json").exists():
            self.cli("export", str(self.args.model), "-o", str(plain), "--force")
        for start in (2, 4, 6):
            art = self.work / f"art-sevi{start}"
            if not (art / "manifest.json").exists():
                tmp = self.work / f".art-sevi{start}.partial"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(plain, tmp)
                self.cli("bake", str(tmp), "--mitigation", "clva,sevi,probe", "--sevi-start-layer", str(start))
                os.replace(tmp, art)
            arts[f"sevi{start}"] = art
        arts["main"] = arts["sevi2"]
        if self.args.visalign:
            art = self.work / "art-visalign"
            if not (art / "manifest.json").exists():
                self.cli("export", str(self.args.visalign), "-o", str(art), "--force")
            arts["visalign"] = art
        return arts

    # -- one evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, bench: str, art: Path, tag: str, methods: str = "", sets: list[str] | None = None,
                 backend: str = "onnx", extra: tuple[str, ...] = (), limit: int | None = None) -> dict:
        out = self.work / "runs" / f"{bench}-{tag}"
        argv = ["eval", bench, str(art), "--out", str(out), "--no-progress", "--batch-size", str(self.args.batch_size)]
        if methods:
            argv += ["--mitigation", methods]
        for item in extra:
            argv += ["--set", item]
        if backend == "torch":
            argv += ["--backend", "torch", "--model", str(self.args.model)]
        limit = min(x for x in (limit, self.args.limit) if x) if (limit or self.args.limit) else None
        if limit:
            argv += ["--limit", str(limit)]
        p, c = self.sets / "pope", self.sets / "chair"
        if bench == "pope":
            for split in sets or SPLITS:
                argv += ["-q", str(p / f"world_pope_{split}.json")]
            argv += ["--image-root", str(p / "images")]
        elif bench == "mme":
            argv += ["--root", str(self.sets / "mme")]
            for subset in sets or ():
                argv += ["--subset", subset]
        else:
            argv += ["--instances", str(c / "instances_world.json"), "--captions", str(c / "captions_world.json"),
                     "--synonyms", str(c / "synonyms.txt"), "--image-root", str(c / "images")]
        t0 = time.perf_counter()
        self.cli(*argv)
        print(f"  {bench:5s} {tag:34s} {time.perf_counter() - t0:6.1f} s", flush=True)
        return json.loads((out / "results.json").read_text())["results"]


def pope_cells(res: dict) -> list[str]:
    cells = []
    for split in SPLITS:
        r = res.get(f"world_pope_{split}")
        cells += [f"{r['accuracy']:.3f}", f"{r['f1']:.3f}", f"{r['yes_ratio']:.3f}", f"{r['false_positive_rate']:.3f}"] \
            if r else ["", "", "", ""]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "samples" / "demo-llava")
    parser.add_argument("--visalign", type=Path, default=None, help="a VisAlign checkpoint of --model")
    parser.add_argument("--sets", type=Path, default=ROOT / "out" / "world-eval")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "eval-demo")
    parser.add_argument("--limit", type=int, default=None, help="questions per set (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--sweep-limit", type=int, default=1000,
                        help="adversarial questions per sweep setting (the first N; the baseline row uses the same N)")
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                        help="the PyTorch reference for CLVA on the adversarial split")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        raise SystemExit(f"error: no checkpoint at {args.model}; train one with scripts/train_demo.py")
    if args.visalign and not (args.visalign / "visalign.safetensors").exists():
        raise SystemExit(f"error: {args.visalign} is not a VisAlign checkpoint (no visalign.safetensors); "
                         "train one with `anchorrt visalign train`")
    if not (args.sets / "pope" / "world_pope_adversarial.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_eval_sets.py"), "--out", str(args.sets)],
                       check=True, stdout=subprocess.DEVNULL)
    args.work.mkdir(parents=True, exist_ok=True)
    run = Runner(args)
    t0 = time.perf_counter()
    arts = run.artifacts()
    main_art = arts["main"]

    rows = [("baseline", main_art, ""), ("CLVA", main_art, "clva"), ("SEVI (start_layer 2)", main_art, "sevi"),
            ("CLVA + SEVI", main_art, "clva,sevi"), ("IAVA", main_art, "iava")]
    if "visalign" in arts:
        rows.append(("VisAlign (stage 1 + 2)", arts["visalign"], ""))
    table: dict[str, dict] = {}
    for name, art, methods in rows:
        tag = (methods.replace(",", "+") or "baseline") + ("-visalign" if art == arts.get("visalign") else "")
        table[name] = {b: run.evaluate(b, art, tag, methods) for b in ("pope", "mme", "chair")}
    reference = None
    if args.reference:
        reference = run.evaluate("pope", main_art, "clva-torch", "clva", sets=["adversarial"], backend="torch")

    sweep: list[tuple[str, dict, dict]] = []
    if args.sweep:
        grid = [("clva", main_art, f"clva.alpha={a}") for a in (2, 28)]
        grid += [("clva", main_art, "clva.beta=0"), ("clva", main_art, "clva.tau=1")]
        grid += [("sevi", arts[f"sevi{s}"], f"start_layer={s}, sevi.omega=0.5") for s in (4, 6)]
        grid += [("sevi", main_art, f"start_layer=2, sevi.omega={w}") for w in (1, 2)]
        grid += [("iava", main_art, "iava.alpha=2")]
        grid += [("iava", main_art, f"iava.i={i}") for i in (0.25, 0.5)]
        for method, art, label in grid:
            sets = [s.strip() for s in label.split(",") if "=" in s and s.strip().startswith(method + ".")]
            tag = f"sweep-{label.replace(', ', '-').replace('=', '')}"
            res_p = run.evaluate("pope", art, tag, method, sets=["adversarial"], extra=tuple(sets),
                                 limit=args.sweep_limit)
            res_m = run.evaluate("mme", art, tag, method, sets=["position"], extra=tuple(sets))
            sweep.append((f"{method.upper()} {label}", res_p, res_m))

    lines = ["## POPE (accuracy / F1 / yes-ratio / FP rate per split)", "",
             "| method | " + " | ".join(f"{s} acc | F1 | yes | FP" for s in SPLITS) + " |",
             "|---|" + "---|" * 12]
    for name, res in table.items():
        lines.append(f"| {name} | " + " | ".join(pope_cells(res["pope"])) + " |")
    if reference:
        r = reference["world_pope_adversarial"]
        lines.append(f"| CLVA, PyTorch reference | | | | | | | | | {r['accuracy']:.3f} | {r['f1']:.3f} | "
                     f"{r['yes_ratio']:.3f} | {r['false_positive_rate']:.3f} |")
    lines += ["", "## MME (score = 100 acc + 100 acc+) and CHAIR", "",
              "| method | existence | color | position | MME total | CHAIR_s | CHAIR_i | recall |", "|---|" + "---|" * 7]
    for name, res in table.items():
        m, c = res["mme"], res["chair"]
        lines.append(f"| {name} | " + " | ".join(f"{m[s]['score']:.1f}" for s in MME_SUBSETS) +
                     f" | {m['totals']['perception']:.1f} | {c['chair_s']:.3f} | {c['chair_i']:.3f} | {c['recall']:.3f} |")
    if sweep:
        bp = run.evaluate("pope", main_art, "sweep-baseline", sets=["adversarial"],
                          limit=args.sweep_limit)["world_pope_adversarial"]
        bm = table["baseline"]["mme"]["position"]
        lines += ["", f"## Sweep (POPE adversarial, first {bp['n']} questions; MME position, all)", "",
                  "| setting | adv acc | F1 | yes | FP | position acc | position score |", "|---|" + "---|" * 6]
        lines.append(f"| baseline | {bp['accuracy']:.3f} | {bp['f1']:.3f} | {bp['yes_ratio']:.3f} | "
                     f"{bp['false_positive_rate']:.3f} | {bm['acc']:.3f} | {bm['score']:.1f} |")
        for label, res_p, res_m in sweep:
            p, m = res_p["world_pope_adversarial"], res_m["position"]
            lines.append(f"| {label} | {p['accuracy']:.3f} | {p['f1']:.3f} | {p['yes_ratio']:.3f} | "
                         f"{p['false_positive_rate']:.3f} | {m['acc']:.3f} | {m['score']:.1f} |")
    text = "\n".join(lines) + "\n"
    (args.work / "table.md").write_text(text)
    (args.work / "table.json").write_text(json.dumps({"table": table, "reference": reference,
                                                      "sweep": [list(s) for s in sweep]}, indent=1) + "\n")
    print(text)
    print(f"wrote {args.work / 'table.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
