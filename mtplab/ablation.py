"""`mtplab ablate`: AOMTS's nine-run table (TST x MTP depth, optimizer reset, cosine) on your data.

Every row is the recipe plus a few overrides, trained for the same number of steps into an ordinary
run directory `DIR/<row>/`; a finished row is skipped and an unfinished one resumed, so re-running the
command after an interruption continues where it stopped. All rows share one BPE trained once on the
training corpus (DIR/tokenizer.json), so their validation cross-entropies are in the same units.
The score is the main head's held-out next-token CE in nats at the last step, as on AOMTS's cards.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_write, atomic_write_text
from .config import Config, load_config
from .errors import MtplabError
from .evaluation.plots import read_metrics
from .models.checkpoint import step_dirs


@dataclass(frozen=True)
class Row:
    name: str
    mtp_depth: int  # extra heads (model.n_future - 1)
    tst: bool
    schedule: str = "wsd"
    reset: bool = False
    seed_offset: int = 0  # a second seed of the same configuration
    aomts_loss: float | None = None  # the AOMTS card's validation loss, for reference
    aomts_model: str = ""  # that card's model name


ROWS = [
    Row("tst-1mtp", 1, True, aomts_loss=2.204673, aomts_model="AOMTS-TST-s6-100M-3k-1MTP-v1"),
    Row("tst-0mtp", 0, True, aomts_model="AOMTS-TST-s6-100M-3k-0MTP-v1"),  # the card gives no value
    Row("tst-2mtp", 2, True, aomts_loss=2.214605, aomts_model="AOMTS-TST-s6-100M-3k-2MTP-v1"),
    Row("base-1mtp", 1, False, aomts_loss=2.276289, aomts_model="AOMTS-Base-100M-3k-1MTP-v1"),
    Row("base-2mtp", 2, False, aomts_loss=2.284260, aomts_model="AOMTS-Base-100M-3k-2MTP-v1"),
    Row("base-0mtp", 0, False, aomts_loss=2.287432, aomts_model="AOMTS-Base-100M-3k-0MTP-v1-run2"),
    Row("tst-0mtp-reset", 0, True, reset=True, aomts_loss=2.302689,
        aomts_model="AOMTS-TST-s6-100M-3k-0MTP-RESET-v1"),
    Row("base-1mtp-cosine", 1, False, schedule="cosine", aomts_loss=2.354897,
        aomts_model="AOMTS-Base-100M-3k-1MTP-Cosine-v1"),
    # The card's first base run; the same setting as base-0mtp, so the pair measures run-to-run noise.
    Row("base-0mtp-seed2", 0, False, seed_offset=1, aomts_loss=2.375539,
        aomts_model="AOMTS-Base-100M-3k-0MTP-v1"),
]
ROW_NAMES = [r.name for r in ROWS]

# TST against the same run without it, and the two seeds of the baseline (run-to-run noise).
TST_PAIRS = [("tst-0mtp", "base-0mtp"), ("tst-1mtp", "base-1mtp"), ("tst-2mtp", "base-2mtp")]
NOISE_PAIR = ("base-0mtp", "base-0mtp-seed2")
GAP_FRACTIONS = (0.4, 2 / 3, 1.0)  # where along training the TST - base gaps are read (600/1000/1500 of 1500)

# AOMTS's comparisons: (a, b) means its cards give a lower loss for a than for b.
ORDERINGS = [
    ("tst-1mtp", "base-0mtp", "TST + 1 head beats the plain baseline"),
    ("tst-1mtp", "tst-2mtp", "with TST, 1 head beats 2"),
    ("tst-2mtp", "base-1mtp", "TST + 2 heads beats every non-TST run"),
    ("base-1mtp", "base-0mtp", "1 MTP head helps without TST"),
    ("base-2mtp", "base-0mtp", "2 MTP heads help without TST"),
    ("base-1mtp", "base-2mtp", "without TST, 1 head beats 2"),
    ("tst-1mtp", "base-1mtp", "TST helps at 1 head"),
    ("base-0mtp", "tst-0mtp-reset", "resetting the optimizer at the switch loses TST's gain"),
    ("base-1mtp", "base-1mtp-cosine", "WSD beats cosine"),
]


def row_config(base: Config, row: Row, steps: int | None, tokenizer: Path) -> Config:
    config = Config.from_dict(base.to_dict())
    t = config.train
    if steps is not None:
        t.steps = steps
        t.warmup_steps = min(t.warmup_steps, max(0, steps // 10))
        t.eval_every = min(t.eval_every, steps)
    config.model.n_future = row.mtp_depth + 1
    bag = t.tst_bag or 6  # the recipe may set the bag size; AOMTS's is 6
    t.tst_bag = bag if row.tst else 0
    t.tst_reset_optimizer = row.reset
    t.schedule = row.schedule
    t.seed += row.seed_offset
    config.tokenizer.path = str(tokenizer)
    return config


# What the rows themselves set: a --set of these would be overwritten row by row.
ROW_KEYS = ("model.n_future", "train.tst_reset_optimizer", "train.schedule")


def check_overrides(overrides: list[str]) -> None:
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in ROW_KEYS:
            raise MtplabError(f"--set {text}: every ablation row sets {key} itself (the rows are "
                              f"defined by {', '.join(ROW_KEYS)}); use --rows to pick rows")


def tst_tokens_needed(base: Config, rows: list[Row], steps: int | None) -> tuple[int, int]:
    """(tokens, window): what TST phase 1 of the selected rows needs, one batch of distinct
    windows of bag x (seq_len + 1) + heads - 1 raw tokens (0, 0 when no row runs phase 1)."""
    from .training import tst

    needed = (0, 0)
    for row in rows:
        config = row_config(base, row, steps, Path("tokenizer.json"))
        if tst.phase1_steps(config):
            window = tst.window_length(config.data.seq_len, config.train.tst_bag, config.model.n_future)
            needed = max(needed, (config.train.batch_size * (window - 1) + 1, window))
    return needed


def check_tst_corpus(base: Config, rows: list[Row], steps: int | None, tokenizer: Path) -> None:
    """Refuse, before any row trains, a corpus whose training split cannot fill one TST batch."""
    from .data.pipeline import _texts, load_examples
    from .tokenizer import Tokenizer

    needed, window = tst_tokens_needed(base, rows, steps)
    if not needed:
        return
    tok = base.tokenizer
    tokenizer = Tokenizer.from_path(tokenizer, tok.special_tokens, tok.eos, tok.chat_template)
    train, _ = load_examples(base)
    have = 0
    for text in _texts(train, tokenizer.eos):  # encoded until there are enough (a book is plenty)
        ids = tokenizer.encode_batch([text])[0]
        have += len(ids) + 1 if ids else 0
        if have >= needed:
            return
    if have < needed:
        t = base.train
        raise MtplabError(
            f"data: the training split has {have:,} tokens, too few for the TST phase: it needs at least "
            f"{needed:,} (one batch of {t.batch_size} windows of {window} tokens = bag "
            f"{t.tst_bag or 6} x (seq_len {base.data.seq_len} + 1) + heads - 1); use a larger corpus "
            "or lower data.seq_len, train.tst_bag or train.batch_size")


def select_rows(names: str | None) -> list[Row]:
    if not names:
        return list(ROWS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in ROW_NAMES]
    if unknown:
        raise MtplabError(f"unknown ablation row {', '.join(unknown)}; rows: {', '.join(ROW_NAMES)}")
    return [r for r in ROWS if r.name in wanted]


def shared_tokenizer(config: Config, out_dir: Path) -> Path:
    """Train the recipe's BPE once on the training corpus (or take the recipe's tokenizer)."""
    from .data.pipeline import build_tokenizer, load_examples

    path = out_dir / "tokenizer.json"
    if config.tokenizer.path:
        return Path(config.tokenizer.path)
    if not path.exists():
        train, _ = load_examples(config)
        corpus = [ex if isinstance(ex, str) else f"{ex['question']}\n{ex['answer']}" for ex in train]
        tokenizer = build_tokenizer(config, corpus)
        tokenizer.save(out_dir)
    return path


def finished(run_dir: Path, steps: int) -> bool:
    dirs = step_dirs(run_dir)
    return bool(dirs) and dirs[-1][0] >= steps


def final_eval(run_dir: Path) -> tuple[float | None, list[tuple[int, float]]]:
    """The main head's held-out CE at the last evaluation, and the curve of all evaluations."""
    curve = [(r["step"], r["eval_head_losses"][0]) for r in read_metrics(run_dir / "metrics.jsonl")
             if "eval_head_losses" in r]
    return (curve[-1][1] if curve else None), curve


def run_ablation(recipe: str | Path, out_dir: str | Path, steps: int | None = None,
                 rows: str | None = None, data: str | None = None, overrides: list[str] = (),
                 progress: bool = True) -> dict:
    """Train (or resume, or skip) every selected row, then write ablation.md, ablation.json and
    loss_curves.png under `out_dir`. Returns the JSON report."""
    out_dir = Path(out_dir)
    overrides = list(overrides)
    if data:  # a real text corpus: packed next-token data
        overrides += ["data.source=text", f"data.path={data}", "data.format=lm"]
    base = load_config(recipe, overrides)
    if base.data.format != "lm":
        raise MtplabError("ablate needs packed text (data.format = \"lm\"): TST reads bags of tokens")
    if steps is not None and steps < 1:
        raise MtplabError("--steps must be >= 1")
    check_overrides(overrides)
    selected = select_rows(rows)
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtplabError(f"cannot create {out_dir}: {exc.strerror}") from None
    try:
        return _run_rows(recipe, out_dir, base, selected, steps, data, progress)
    except BaseException:
        # a command that fails before any row has a run directory leaves no directory it made
        # (the shared tokenizer is only a cache); a row trained or under way is kept for the re-run
        if made and out_dir.is_dir() and not any(p.is_dir() for p in out_dir.iterdir()):
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _run_rows(recipe, out_dir: Path, base: Config, selected: list[Row], steps: int | None, data: str | None,
              progress: bool) -> dict:
    from .training.trainer import train

    tokenizer = shared_tokenizer(base, out_dir)
    check_tst_corpus(base, selected, steps, tokenizer)
    t0 = time.perf_counter()
    results = []
    # one bar over the rows (position 0) and, below it, the current row's step bar, which clears
    # itself when the row ends; each finished row leaves one line above the bars
    bar = tqdm(total=len(selected), desc="ablation", unit="row", disable=not progress, position=0,
               dynamic_ncols=True)
    for row in selected:
        bar.set_postfix_str(row.name)
        config = row_config(base, row, steps, tokenizer)
        run_dir = out_dir / row.name
        seconds, status = 0.0, "skipped (finished)"
        if not finished(run_dir, config.train.steps):
            resume = run_dir.exists()
            result = train(config, run_dir, resume=resume, progress=progress,
                           bar_options={"position": 1, "leave": False, "desc": row.name})
            seconds, status = result.seconds, "resumed" if resume else "trained"
            if result.stopped_by:
                raise MtplabError(f"stopped by {result.stopped_by} during {row.name}; re-run the same "
                                  "command to continue")
        loss, curve = final_eval(run_dir)
        bar.update(1)
        if progress:
            shown = f"{loss:.4f}" if loss is not None else "-"
            took = f" in {seconds:.0f} s" if seconds < 120 else f" in {seconds / 60:.1f} min"
            bar.write(f"{row.name}: val CE {shown} nats, {status}" + (took if seconds else ""),
                      file=sys.stderr)
        results.append({"row": row.name, "mtp_depth": row.mtp_depth, "tst": row.tst,
                        "tst_bag": config.train.tst_bag, "schedule": row.schedule, "reset": row.reset,
                        "seed": config.train.seed, "steps": config.train.steps, "val_loss": loss,
                        "seed_002_loss": row.aomts_loss, "seed_002_model": row.aomts_model,
                        "seconds": round(seconds, 1), "status": status, "curve": curve,
                        "run_dir": str(run_dir)})
    bar.close()
    report = {"recipe": str(recipe), "data": data or base.data.path or base.data.source,
              "steps": results[0]["steps"] if results else steps, "seconds": round(time.perf_counter() - t0, 1),
              "rows": sorted(results, key=_sort_key), "noise": noise(results)}
    report["orderings"] = check_orderings(results, report["noise"])
    report["tst_gaps"] = tst_gaps(results)
    atomic_write_text(out_dir / "ablation.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out_dir / "ablation.md", format_table(report))
    plot_curves(report, out_dir / "loss_curves.png")
    return report


def _sort_key(r: dict) -> tuple:
    return (r["val_loss"] is None, r["val_loss"] if r["val_loss"] is not None else 0.0)


def noise(results: list[dict]) -> float | None:
    """How far apart the baseline's two seeds ended: a margin smaller than this says little."""
    loss = {r["row"]: r["val_loss"] for r in results}
    a, b = (loss.get(name) for name in NOISE_PAIR)
    return round(abs(a - b), 4) if a is not None and b is not None else None


def check_orderings(results: list[dict], noise_level: float | None = None) -> list[dict]:
    loss = {r["row"]: r["val_loss"] for r in results}
    out = []
    for a, b, claim in ORDERINGS:
        if loss.get(a) is None or loss.get(b) is None:
            continue
        margin = loss[b] - loss[a]
        out.append({"claim": claim, "lower": a, "higher": b, "reproduced": margin > 0,
                    "margin": round(margin, 4),
                    "within_noise": noise_level is not None and abs(margin) <= noise_level})
    return out


def tst_gaps(results: list[dict]) -> dict:
    """TST's held-out CE minus the same run's without TST, at evaluations along training: does
    the gap close as the recovery phase lengthens?"""
    curves = {r["row"]: dict(r["curve"]) for r in results}
    pairs = [(a, b) for a, b in TST_PAIRS if curves.get(a) and curves.get(b)]
    if not pairs:
        return {"steps": [], "pairs": []}
    shared = sorted(set.intersection(*(set(curves[a]) & set(curves[b]) for a, b in pairs)))
    last = shared[-1] if shared else 0
    steps = sorted({min(shared, key=lambda s: abs(s - f * last)) for f in GAP_FRACTIONS}) if shared else []
    return {"steps": steps,
            "pairs": [{"tst": a, "base": b, "gaps": [round(curves[a][s] - curves[b][s], 4) for s in steps]}
                      for a, b in pairs]}


def format_table(report: dict) -> str:
    lines = [f"# Ablation: {report['recipe']} on {report['data']}, {report['steps']} steps per row",
             "",
             "Main head's held-out next-token cross-entropy (nats), lower is better; sorted like "
             "AOMTS's table. Its numbers (100M parameters, 3,000 steps, Wikipedia) are beside "
             "for reference, not for direct comparison.",
             "",
             "| row | MTP depth | TST | schedule | optim reset | val CE (nats) | AOMTS |",
             "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        tst = f"yes (s={r['tst_bag']})" if r["tst"] else "no"
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "—"
        aomts = f"{r['seed_002_loss']:.4f}" if r["seed_002_loss"] is not None else "—"
        lines.append(f"| {r['row']} | {r['mtp_depth']} | {tst} | {r['schedule'].upper()} | "
                     f"{'yes' if r['reset'] else ''} | {loss} | {aomts} |")
    if report.get("noise") is not None:
        lines += ["", f"Run-to-run noise ({' vs '.join(NOISE_PAIR)}, the same setting, two seeds): "
                      f"{report['noise']:.4f} nats."]
    if report["orderings"]:
        lines += ["", "AOMTS's orderings at this scale:", ""]
        for o in report["orderings"]:
            mark = "reproduced" if o["reproduced"] else "not reproduced"
            within = " (within the noise)" if o.get("within_noise") else ""
            lines.append(f"- {o['claim']} ({o['lower']} < {o['higher']}): {mark}, "
                         f"margin {o['margin']:+.4f}{within}")
    gaps = report.get("tst_gaps") or {}
    if gaps.get("pairs"):
        lines += ["", "TST minus the same run without it, held-out CE (nats; negative: TST better) by step:",
                  "", "| pair | " + " | ".join(f"step {s}" for s in gaps["steps"]) + " |",
                  "|---|" + "---|" * len(gaps["steps"])]
        for g in gaps["pairs"]:
            lines.append(f"| {g['tst']} − {g['base']} | " + " | ".join(f"{x:+.4f}" for x in g["gaps"]) + " |")
    lines += ["", f"Wall time of this invocation: {report['seconds'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def plot_curves(report: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(report["rows"]):
        if r["curve"]:
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, color=f"C{i}",
                    markersize=3, linestyle="--" if r["tst"] else "-", label=r["row"])
    ax.set_xlabel("step")
    ax.set_ylabel("held-out CE of the main head (nats)")
    ax.set_title("mtplab ablate (dashed: TST)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
