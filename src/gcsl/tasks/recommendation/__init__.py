"""LLM recommendation: rating data, prompts, grounding of generated titles and graded ranking metrics.

Protocol (BIGRec / SPRec / D3, as used by the paper):

- **Data.** Each user's interactions are ordered by time (ties: source order). Every interaction
  after the user's first is one example: history = the previous <= ``history_len`` items with
  their titles and ratings, target = the item with its rating (1-5). Users with fewer than
  ``min_interactions`` interactions are dropped (counted in ``stats``).
- **Restricted catalogue (deviation, off by default).** ``top_items`` = N keeps only the N most-rated
  items (ties: catalogue order): ratings of other items are removed before users are counted and
  histories built, so targets, histories and the catalogue all hold those N items. The paper ranks
  against the whole catalogue; the restriction (with shorter histories) makes the task learnable by a
  135M model on CPU (``configs/cpu/movielens-rank.yaml``). The folder ``gcsl data recommendation``
  writes holds ``catalogue.jsonl``; given as the evaluator's ``path``, every method and baseline is
  ranked against exactly those items.
- **Split.** All examples are ordered by the target's timestamp; ties keep source order (a stable
  sort: file line of the target for MovieLens, row order for CSV files). The first
  ``int(0.8 n)`` are train, the next up to ``int(0.9 n)`` validation, the rest test (D3's rule).
  A D3 folder that already holds train/valid/test files keeps its split.
- **Sampling.** ``n_train`` / ``n_valid`` / ``n_test`` examples (paper: 4,096 / 512 / 1,000) are
  drawn without replacement, each split from its own generator ``default_rng([seed, split])``, so
  changing one size leaves the other samples alone; a sample keeps chronological order.
- **Grounding.** A generation's title is its first quoted span (straight or curly double quotes),
  else its first non-empty line. It is embedded with a sentence-transformer and every catalogue
  title is ranked by cosine similarity. The target's rank is the best rank among items carrying
  the target's title (duplicates count once). **Tie policy (pessimistic):** an item with another
  title whose similarity equals the target's is ranked above the target, so a degenerate
  embedding (e.g. all similarities equal) earns no credit. Rank = 1 + number of catalogue items
  with a different title and similarity >= the target title's.
- **Metrics.** NDCG@k, ERR@k (R(g) = (2^g - 1) / 2^g_max, g_max = 5 by default) and HR@k with the
  target's rating as grade (:mod:`gcsl.metrics.ranking`). NDCG's ideal is an item of grade g_max
  at rank 1 by default (``ndcg_ideal=g_max``: NDCG and ERR both value higher ratings more, as the
  paper states); ``ndcg_ideal=target`` puts the target itself there, so NDCG = 1/log2(rank + 1)
  whatever its rating (the form BIGRec, D3 and SPRec report). A generation with no usable title is
  unfound: rank inf, every metric 0, and its ``reason`` recorded. Each metric is averaged over a
  prompt's generations, then over prompts.
- **BIGRec grounding.** ``grounding: bigrec-l2`` replaces the sentence-transformer by the base LLM's
  last-layer last-token states and cosine by L2 distance, optionally popularity-adjusted
  (:mod:`~gcsl.tasks.recommendation.bigrec`); ``gcsl experiment`` scores the ``bigrec`` method with it.

Data sources: MovieLens-100k from the ``recbole`` wheel (never imported; only its data folder is
read) and D3-style Amazon CSV files (``user_id, item_asins, item_asin, history_item_id, item_id,
history_item_title, item_title, history_rating, rating, history_timestamp, timestamp``; history
columns are Python list literals). ``gcsl data recommendation --out DIR`` writes the feedback logs
and prompt files.

Modules: :mod:`~gcsl.tasks.recommendation.data` (records, loaders, split, sampling),
:mod:`~gcsl.tasks.recommendation.prompts` (prompts and files),
:mod:`~gcsl.tasks.recommendation.grounding` (titles -> ranks),
:mod:`~gcsl.tasks.recommendation.evaluation` (the evaluator),
:mod:`~gcsl.tasks.recommendation.baselines` (the ``random`` and ``most-popular`` sanity baselines, no model),
:mod:`~gcsl.tasks.recommendation.bigrec` (BIGRec's training rows, LLM embedding and popularity adjustment).
"""

from __future__ import annotations

from gcsl.tasks.base import MetricSpec, Task
from gcsl.tasks.recommendation.baselines import (
    BASELINES,
    BaselineConfig,
    history_titles,
    popularity_ranking,
    write_baseline_generations,
)
from gcsl.tasks.recommendation.bigrec import LastTokenEncoder, bigrec_positives, popularity_adjusted
from gcsl.tasks.recommendation.data import (
    CATALOGUE_FILE,
    D3_COLUMNS,
    SPLITS,
    CatalogueItem,
    HistoryEntry,
    Interaction,
    RecommendationData,
    RecommendationDataConfig,
    load_amazon,
    load_catalogue,
    load_movielens,
    load_recommendation_data,
    most_rated,
    movielens_dir,
    read_catalogue_file,
    sample_splits,
    split_by_time,
)
from gcsl.tasks.recommendation.evaluation import RecommendationEvalConfig, build_grounder, evaluate
from gcsl.tasks.recommendation.grounding import (
    GROUNDINGS,
    TIE_POLICY,
    GroundedTitle,
    TitleGrounder,
    extract_title,
    load_encoder,
)
from gcsl.tasks.recommendation.prompts import (
    build_prompt,
    catalogue_answers,
    export_recommendation_files,
    feedback_rows,
    format_response,
    prompt_rows,
    write_feedback_log,
    write_prompts,
    write_recommendation_data,
)

__all__ = [
    "TASK",
    "CatalogueItem",
    "HistoryEntry",
    "Interaction",
    "RecommendationData",
    "RecommendationDataConfig",
    "RecommendationEvalConfig",
    "TitleGrounder",
    "GroundedTitle",
    "TIE_POLICY",
    "D3_COLUMNS",
    "SPLITS",
    "movielens_dir",
    "load_movielens",
    "load_amazon",
    "load_catalogue",
    "load_recommendation_data",
    "split_by_time",
    "sample_splits",
    "build_prompt",
    "catalogue_answers",
    "format_response",
    "feedback_rows",
    "prompt_rows",
    "write_feedback_log",
    "write_prompts",
    "export_recommendation_files",
    "write_recommendation_data",
    "extract_title",
    "load_encoder",
    "evaluate",
    "BASELINES",
    "BaselineConfig",
    "write_baseline_generations",
    "popularity_ranking",
    "history_titles",
    "CATALOGUE_FILE",
    "most_rated",
    "read_catalogue_file",
    "build_grounder",
    "GROUNDINGS",
    "LastTokenEncoder",
    "bigrec_positives",
    "popularity_adjusted",
]

# The feedback is the user's 1-5 rating; no ranking metric is on that scale.
TASK = Task(
    name="recommendation",
    summary="LLM recommendation on MovieLens-100k or D3-style Amazon ratings: grounded NDCG@k, ERR@k, HR@k",
    eval_config=RecommendationEvalConfig,
    evaluate=evaluate,
    data_config=RecommendationDataConfig,
    write_data=write_recommendation_data,
    # the rank and the target's rating give every metric again (NDCG, ERR and HR under any k or ideal)
    item_fields=("target_title", "target_rating", "extracted_title", "nearest_title", "rank"),
    metrics=(
        MetricSpec("ndcg@{k}", True, False, "NDCG@k of the target's grounded rank, graded by its rating "
                   "(ideal: --ndcg-ideal), averaged over a prompt's generations, then prompts"),
        MetricSpec("err@{k}", True, False, "ERR@k = R(rating) / rank within the top k, R(g) = (2^g - 1) / 2^g_max"),
        MetricSpec("hr@{k}", True, False, "hit rate: share of generations whose grounded rank is <= k"),
        MetricSpec("unparsable", False, False, "share of generations naming no usable title (scored 0)"),
    ),
)
