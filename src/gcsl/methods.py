"""The method table: every training method, and the baselines (``base``, ``random``, ``most-popular``), described once.

Each layer reads what it needs from a :class:`Method` instead of testing method names:
``gcsl prepare`` calls its formulation and fills its columns, :class:`~gcsl.goals.GoalSetup`
renders and requests goals by its goal fields, ``gcsl train`` picks the trainer and checks the
prepared columns, and the model card quotes its summary. Adding an offline method is one entry
in :data:`METHODS` plus, when no existing one fits, its formulation in :mod:`gcsl.goals.formulate`.

Light on purpose: importing it loads numpy and the goals package, never torch.

>>> get_method("gcsl-bey-nl").goal_request, get_method("gcsl-bey-nl").beyond
('threshold', True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from gcsl.errors import ConfigError
from gcsl.goals.formulate import (
    Formulation,
    FormulationInput,
    Pairs,
    beyond_threshold,
    bigrec_positives,
    bottom_fraction,
    per_level,
    preference_pairs,
    top_fraction,
    unquantized,
)

__all__ = [
    "Method",
    "METHODS",
    "get_method",
    "trained_methods",
    "COMPLETION_COLUMNS",
    "PAIR_COLUMNS",
    "SMOOTHING_COLUMN",
    "GoalInput",
    "GoalRequest",
    "TrainerKind",
    "OnlineAlgorithm",
    "BASE_MODEL",
]

# What the model reads as its goal: nothing, a reward token or goal text in the prompt, or a number
# through the learned goal embedding (a soft token before the prompt).
GoalInput = Literal["none", "token", "text", "embedding"]
# What a goal request (`--goal top`, a value, `scale:F`, `level:K`) becomes: nothing; a trained
# level (a value snaps to the nearest trained one); a threshold written into the goal text (any
# value); or the raw value itself.
GoalRequest = Literal["none", "level", "threshold", "value"]
# Which trainer fits it: GcslSFTTrainer on prompt/completion rows ("embed": the same with the goal
# embedding attached), a TRL preference trainer on pairs, or none at all (the untrained base model).
TrainerKind = Literal["sft", "embed", "preference", "none"]
# The TRL trainer of an online RL method: GRPOTrainer or RLOOTrainer (gcsl.training.online).
OnlineAlgorithm = Literal["grpo", "rloo"]

# In a method's evaluate_defaults, stands for the experiment's base model (`gcsl experiment` substitutes it).
BASE_MODEL = "@base-model"

# The columns `gcsl train` reads (and requires non-empty) for each data layout.
COMPLETION_COLUMNS = ("prompt", "completion")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
# An optional column of pair data: each pair's label-smoothing factor (RosePO's personalized smoothing), read by
# `gcsl train --preference-loss rosepo`.
SMOOTHING_COLUMN = "smoothing"


@dataclass(frozen=True)
class Method:
    """One method: how its data are formulated, how its goal is written, read and requested, how it trains.

    ``goal_style`` is the rendering style of :func:`gcsl.goals.render_goal` (``token``,
    ``token-bey``, ``range``, ``bey``, ``snl``, ``value``; None when no goal text is written).
    ``beyond``: rows are the beyond-threshold expansion (one per retained threshold a response
    reaches). ``filtering``: ``--filter`` applies, keeping only goals above the training mean.
    ``columns``: what training reads from ``train.parquet``, each required non-empty.
    ``experts``: a decoding-time method (DExperts) steers the untrained base model while it samples,
    with an expert and an anti-expert adapter trained by these two methods of the table; `gcsl
    experiment` trains them, `gcsl prepare` / `gcsl train` do not take the method itself.
    ``classifier``: a decoding-time method steered by an attribute classifier (PPLM): `gcsl experiment` trains the
    classifier on the feedback (:mod:`gcsl.generation.pplm`) and samples the untrained base model with it.
    ``heuristic``: no model at all; `gcsl experiment` has the task's own module write its generations (a
    sanity baseline such as a random or the most popular item). ``tasks``: the only tasks the method
    makes sense for (None: every task); a heuristic names them. ``online``: an online RL baseline (TRL's
    ``grpo`` or ``rloo`` trainer) that samples from its own LoRA adapter on the training prompts and learns
    from the task's scorer (:mod:`gcsl.training.online`); no prepared data, no goal, `gcsl experiment` only.
    ``loop``: an online loop (:mod:`gcsl.training.online_loop`) that, round after round, samples its own model
    on the training prompts, scores the samples with the task's scorer, adds them to a pool and prepares and
    trains the same adapter again with this offline method of the table (e.g. ``gcsl-bey-nl``); the entry
    itself has no trainer, goal or columns: the final model is a model of ``loop``, goals.json and all.
    ``recipe``: a recommendation preference recipe (``rosepo`` or ``sprec``) that builds its own pairs from the log,
    the catalogue and the model's own recommendations and trains in stages (SFT, then DPO; SPRec in self-play
    rounds) with :mod:`gcsl.tasks.recommendation.preference`; `gcsl experiment` only, no trainer or goal of its own.
    ``train_defaults``: (TrainConfig option, value) pairs a loop's rounds train with unless the experiment's own
    ``train`` options set them (e.g. ``quark``'s KL and entropy coefficients); pairs, so the entry stays frozen.
    ``evaluate_defaults``: (evaluator option, value) pairs its generations are scored with unless the experiment's
    ``evaluate`` block sets them (e.g. ``bigrec``'s own grounding); the value :data:`BASE_MODEL` is the
    experiment's base model. Evaluator options are a task's, so such an entry names its ``tasks``.
    ``erases``: an unlearning baseline (LLMEraser) with no training of its own: `gcsl experiment` trains an adapter
    with the first method of the table (every row) and prepares the rows to remove with the second, then
    :mod:`gcsl.training.eraser` takes their influence out of that adapter.
    """

    name: str
    summary: str
    formulate: Callable[[FormulationInput], Formulation | Pairs] | None
    goal_style: str | None = None
    goal_input: GoalInput = "none"
    goal_request: GoalRequest = "none"
    beyond: bool = False
    filtering: bool = False
    trainer: TrainerKind = "sft"
    columns: tuple[str, ...] = COMPLETION_COLUMNS
    experts: tuple[str, str] | None = None
    heuristic: bool = False
    tasks: tuple[str, ...] | None = None
    online: OnlineAlgorithm | None = None
    loop: str | None = None
    train_defaults: tuple[tuple[str, Any], ...] = ()
    recipe: str | None = None
    erases: tuple[str, str] | None = None
    evaluate_defaults: tuple[tuple[str, Any], ...] = ()
    classifier: bool = False

    def __post_init__(self) -> None:
        # A contradictory entry would train one thing and generate another; refuse it at import.
        problems = []
        if (self.goal_input == "none") != (self.goal_request == "none"):
            problems.append("goal_input and goal_request must both be 'none' or both set")
        if (self.goal_input in ("token", "text")) != (self.goal_style is not None):
            problems.append("goal_style is needed exactly when the goal is a token or text")
        if self.goal_input == "token" and self.goal_style not in ("token", "token-bey"):
            problems.append("token goals need goal_style token or token-bey")
        if (self.goal_input == "embedding") != (self.trainer == "embed"):
            problems.append("an embedding goal and the embed trainer go together")
        if self.trainer == "embed" and "goal_value" not in self.columns:
            problems.append("the embed trainer needs a goal_value column")
        if (self.trainer == "preference") != (self.columns == PAIR_COLUMNS):
            problems.append(f"the preference trainer, and only it, reads {', '.join(PAIR_COLUMNS)}")
        if (self.trainer == "none") != (self.formulate is None):
            problems.append("only a method without a prepared model of its own (the base, the base steered while "
                            "decoding, a heuristic, an online method) has no formulation")
        if self.experts is not None and (self.trainer != "none" or self.goal_input != "none"):
            problems.append("a decoding-time method (experts) samples from the untrained base, without a goal")
        if self.experts is not None and (len(self.experts) != 2 or self.name in self.experts):
            problems.append("experts names two other methods: the expert's and the anti-expert's")
        if self.heuristic and (self.trainer != "none" or self.goal_input != "none" or self.experts is not None
                               or self.columns):
            problems.append("a heuristic uses no model: no trainer, goal, experts or training columns")
        if self.heuristic and not self.tasks:
            problems.append("a heuristic writes a task's own answers: name the tasks it applies to")
        if self.online is not None and (self.trainer != "none" or self.goal_input != "none" or self.columns
                                        or self.experts is not None or self.heuristic):
            problems.append("an online method trains on its own samples: no trainer, goal, training columns, "
                            "experts or heuristic")
        if self.loop is not None and (self.trainer != "none" or self.goal_input != "none" or self.columns
                                      or self.experts is not None or self.heuristic or self.online is not None):
            problems.append("an online loop trains with the method it names: no trainer, goal, training columns, "
                            "experts, heuristic or online algorithm of its own")
        if self.loop is not None and self.loop == self.name:
            problems.append("loop names another method of the table, the offline one each round prepares with")
        names = [pair[0] if isinstance(pair, tuple) and len(pair) == 2 else None for pair in self.train_defaults]
        if None in names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            problems.append("train_defaults holds (option, value) pairs, each option once")
        if self.train_defaults and self.loop is None:
            problems.append("train_defaults apply to an online loop's rounds: only an entry with loop carries them")
        names = [pair[0] if isinstance(pair, tuple) and len(pair) == 2 else None for pair in self.evaluate_defaults]
        if None in names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            problems.append("evaluate_defaults holds (option, value) pairs, each option once")
        if self.evaluate_defaults and not self.tasks:
            problems.append("evaluate_defaults are a task's evaluator options: name the tasks the method applies to")
        if self.erases is not None and (self.trainer != "none" or self.goal_input != "none" or self.columns
                                        or self.experts is not None or self.heuristic or self.online is not None
                                        or self.loop is not None or self.recipe is not None or self.classifier):
            problems.append("an unlearning method edits the adapter of the method it names: no trainer, goal, "
                            "training columns, experts, heuristic, online algorithm, loop, recipe or classifier of "
                            "its own")
        if self.erases is not None and (len(self.erases) != 2 or self.name in self.erases):
            problems.append("erases names two other methods: the full adapter's and the erased rows'")
        if self.recipe is not None and (self.recipe not in ("rosepo", "sprec") or self.trainer != "none"
                                        or self.goal_input != "none" or self.columns or self.heuristic
                                        or self.online is not None or self.loop is not None or not self.tasks):
            problems.append("a recipe (rosepo or sprec) trains in its own stages: no trainer, goal, training columns, "
                            "heuristic, online algorithm or loop, and it names its tasks")
        if self.classifier and (self.trainer != "none" or self.goal_input != "none" or self.columns
                                or self.experts is not None or self.heuristic or self.online is not None
                                or self.loop is not None):
            problems.append("a classifier-steered method (PPLM) samples the untrained base: no trainer, goal, "
                            "training columns, experts, heuristic, online algorithm or loop of its own")
        if self.online is not None and self.online not in ("grpo", "rloo"):
            problems.append(f"online must be grpo or rloo, got {self.online!r}")
        if problems:
            raise ConfigError(f"method {self.name!r}: " + "; ".join(problems))

    @property
    def is_goal_conditioned(self) -> bool:
        """Whether the model reads a goal: text, a reward token or a goal embedding."""
        return self.goal_input != "none"

    @property
    def trainable(self) -> bool:
        """Whether `gcsl prepare` / `gcsl train` make a model of it (all but ``base``, ``dexperts``, the
        heuristics and the online methods)."""
        return self.formulate is not None

    @property
    def variant_kind(self) -> str:
        """How `gcsl experiment` makes what it generates with: ``trained`` (prepare -> train),
        ``decoding`` (the base model steered by trained experts while sampling), ``classifier`` (the base model
        steered by an attribute classifier trained on the feedback, PPLM), ``heuristic`` (no
        model: the task's module writes the generations), ``online`` (an adapter trained by online RL on
        its own scored samples), ``loop`` (rounds of sample -> score -> pool -> prepare -> train with the
        ``loop`` method), ``erased`` (an ``erases[0]`` adapter with ``erases[1]``'s rows unlearned) or ``base``
        (the model as it is); a key of the runner's table of variant kinds."""
        if self.trainable:
            return "trained"
        if self.online is not None:
            return "online"
        if self.loop is not None:
            return "loop"
        if self.recipe is not None:  # RosePO / SPRec: staged SFT and DPO on their own pairs
            return "recipe"
        if self.erases is not None:
            return "erased"
        if self.classifier:  # PPLM: the base model steered by an attribute classifier trained on the feedback
            return "classifier"
        return "heuristic" if self.heuristic else "decoding" if self.experts is not None else "base"


def _entries(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


METHODS: Mapping[str, Method] = _entries(
    Method("base", "the base model as it is, untrained (a baseline)", None, trainer="none", columns=()),
    Method("sft", "supervised fine-tuning on the best-rated responses (no goal)", top_fraction),
    Method("sft-aug", "supervised fine-tuning on the GCSL-bey expansion with the goals removed (SFT-aug)",
           beyond_threshold, beyond=True, filtering=True),
    Method("dpo", "preference optimisation on response pairs: DPO (TRL DPOTrainer); with "
                  "`--preference-loss simpo`, SimPO (TRL CPOTrainer, loss_type=simpo); with "
                  "`--preference-loss alphadpo`, AlphaDPO (SimPO's loss with an adaptive per-pair margin)",
           preference_pairs, trainer="preference", columns=PAIR_COLUMNS),
    Method("gcsl", "classic GCSL: each response conditioned on its own quantized level as a reward token",
           per_level, goal_style="token", goal_input="token", goal_request="level"),
    Method("gcsl-nl", "classic GCSL with the level written as a natural-language score range",
           per_level, goal_style="range", goal_input="text", goal_request="level"),
    Method("gcsl-bey", "GCSL-bey: each response conditioned on every retained threshold it exceeds, as reward "
                       "tokens",
           beyond_threshold, goal_style="token-bey", goal_input="token", goal_request="level", beyond=True,
           filtering=True),
    Method("gcsl-bey-nl", "GCSL-bey-NL: each response conditioned on every retained threshold it exceeds, "
                          "as a natural-language instruction",
           beyond_threshold, goal_style="bey", goal_input="text", goal_request="threshold", beyond=True,
           filtering=True),
    Method("gcsl-bey-snl", "GCSL-bey-SNL: like GCSL-bey-NL with the metric's name and target only",
           beyond_threshold, goal_style="snl", goal_input="text", goal_request="threshold", beyond=True,
           filtering=True),
    Method("gcsl-noquant-nl", "GCSL without quantization: the raw score written in the goal",
           unquantized, goal_style="value", goal_input="text", goal_request="value"),
    Method("gcsl-noquant-embed", "GCSL without quantization: the raw score fed through a learned goal embedding",
           unquantized, goal_input="embedding", goal_request="value", trainer="embed",
           columns=(*COMPLETION_COLUMNS, "goal_value")),
    Method("sft-bottom", "supervised fine-tuning on the worst-rated responses (no goal; the fraction is "
                         "`sft_top`, or the rows below `sft_cutoff`): DExperts' anti-expert",
           bottom_fraction),
    Method("dexperts", "DExperts (Liu et al., 2021): the base model's next-token logits plus alpha x (expert - "
                       "anti-expert), an sft and an sft-bottom adapter on the same base, combined while sampling",
           None, trainer="none", columns=(), experts=("sft", "sft-bottom")),
    # PPLM (Dathathri et al., ICLR 2020), discriminator variant; its settings are GenerateConfig's pplm_* options.
    Method("pplm", "PPLM (Dathathri et al., 2020): gradient steps on the base model's key/value history at every "
                   "token push a linear classifier of its mean hidden state towards the desired class (trained on "
                   "the sft vs the sft-bottom rows), with a KL term and geometric-mean fusion with the unsteered "
                   "distribution",
           None, trainer="none", columns=(), classifier=True),
    Method("random", "a uniformly random catalogue item per generation, seeded; no model (a recommendation "
                     "sanity baseline)",
           None, trainer="none", columns=(), heuristic=True, tasks=("recommendation",)),
    Method("most-popular", "the item rated most often in the training feedback that the prompt's history does "
                           "not hold; no model (a recommendation sanity baseline)",
           None, trainer="none", columns=(), heuristic=True, tasks=("recommendation",)),
    # BIGRec (Bao et al., 2023): SFT on the interactions rated above 3 (SAI990323/BIGRec data/movie/process.ipynb),
    # grounded by L2 distance between the base LLM's last-token states (data/movie/evaluate.py).
    Method("bigrec", "BIGRec (Bao et al., 2023): instruction tuning on the interactions rated above 3, its generated "
                     "title grounded to catalogue items by L2 distance between the base model's last-layer last-token "
                     "states (`--grounding bigrec-l2`, optionally popularity-adjusted by `--popularity-gamma`)",
           bigrec_positives, tasks=("recommendation",),
           evaluate_defaults=(("grounding", "bigrec-l2"), ("lm", BASE_MODEL))),
    Method("grpo", "online RL baseline: GRPO (Shao et al., 2024; TRL GRPOTrainer) trains a LoRA adapter on its own "
                   "samples for the training prompts, rewarded by the task's scorer, group-normalised advantages",
           None, trainer="none", columns=(), online="grpo"),
    Method("rloo", "online RL baseline: RLOO (Ahmadian et al., 2024; TRL RLOOTrainer) trains a LoRA adapter on its "
                   "own samples for the training prompts, rewarded by the task's scorer, leave-one-out baseline",
           None, trainer="none", columns=(), online="rloo"),
    Method("online-gcsl-bey-nl", "online GCSL-bey-NL (the paper's future work, in the manner of Quark): rounds of "
                                 "sampling the model at the top goal on the training prompts, scoring the samples "
                                 "with the task's scorer, pooling them with the feedback log, re-quantizing and "
                                 "re-expanding the pool with gcsl-bey-nl and training the same adapter further",
           None, trainer="none", columns=(), loop="gcsl-bey-nl"),
    # Quark's settings: GXimingLu/Quark arguments.py, kl_coef 0.05 and entropy_coef 0.06 (its main.py subtracts
    # the entropy term from the loss, a bonus); K = 5 reward quantiles is `gcsl prepare`'s default bins.
    Method("quark", "Quark (Lu et al., NeurIPS 2022): online loop over classic gcsl, each response conditioned on its "
                    "own quantile's reward token (K = 5), rounds of sampling at the top token, scoring, pooling, "
                    "re-quantizing and training the same adapter further with a KL penalty to the base (0.05) and "
                    "an entropy bonus (0.06)",
           None, trainer="none", columns=(), loop="gcsl", train_defaults=(("kl_coef", 0.05), ("entropy_coef", 0.06))),
    Method("sft-all", "supervised fine-tuning on every response, whatever its score (no goal): the adapter an "
                      "unlearning baseline starts from", unquantized),
    Method("llmeraser", "LLMEraser (Ding et al., ICLR 2025), instance removal: an sft-all adapter with the "
                        "sft-bottom rows' influence taken out by one influence-function update of the LoRA weights, "
                        "(1/n) H^-1 times their summed loss gradient, no retraining",
           None, trainer="none", columns=(), erases=("sft-all", "sft-bottom")),
    Method("rosepo", "RosePO (Liao et al., 2024): SFT on the liked items, then DPO against the SFT model's own wrong "
                     "recommendations (self-hard, helpfulness) and popular or hallucinated items (harmlessness), "
                     "each pair's loss smoothed by an oracle's probability that its label is wrong",
           None, trainer="none", columns=(), tasks=("recommendation",), recipe="rosepo"),
    Method("sprec", "SPRec (Gao et al., WWW 2025): self-play rounds, each SFT on sampled liked items then DPO with "
                    "the previous round's own greedy recommendations for those prompts as the rejected responses",
           None, trainer="none", columns=(), tasks=("recommendation",), recipe="sprec"),
)


def _check_loops(table: Mapping[str, Method]) -> None:
    """A loop names a method of the table that `gcsl prepare` / `gcsl train` make (checked once the table exists)."""
    for method in table.values():
        if method.loop is not None and (method.loop not in table or not table[method.loop].trainable):
            raise ConfigError(f"method {method.name!r}: loop must name a trainable method of the table, got "
                              f"{method.loop!r}")
        bad = [m for m in method.erases or () if m not in table or not table[m].trainable
               or table[m].is_goal_conditioned]
        if bad:
            raise ConfigError(f"method {method.name!r}: erases must name goal-free trainable methods of the table, "
                              f"got {bad[0]!r}")


_check_loops(METHODS)


def get_method(name: str) -> Method:
    """The table's entry for ``name``; an unknown name is a one-line ConfigError listing the valid ones.

    >>> get_method("gcsl").goal_input
    'token'
    """
    # Read the module's table at call time, so a table extended at run time is seen everywhere.
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"method: unknown method {name!r}; use one of {', '.join(METHODS)}")
    return method


def trained_methods() -> tuple[str, ...]:
    """The names `gcsl prepare` and `gcsl train` accept: every method but the untrained ``base``, the
    decoding-time ``dexperts`` (whose experts are trained as ``sft`` and ``sft-bottom``) and ``pplm`` (whose
    classifier `gcsl experiment` trains), the
    model-free heuristics (``random``, ``most-popular``), the online ``grpo`` / ``rloo`` (trained
    by `gcsl experiment` on their own samples), the online loops (``online-gcsl-bey-nl``, ``quark``) and the
    unlearning ``llmeraser`` (an ``sft-all`` adapter with ``sft-bottom``'s rows removed).

    >>> trained_methods()[:3]
    ('sft', 'sft-aug', 'dpo')
    """
    return tuple(name for name, method in METHODS.items() if method.trainable)
