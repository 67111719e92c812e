"""REG4Rec's generative reasoning recommender over the MPQ tokens, and its training and decoding loops.

Model. A causal transformer (the ranker's `Block`s, positions counted back from the most recent item) encodes
the user's history, each item embedded as the layer-normed sum of its M MPQ token embeddings (one table per
expert codebook; an item without tokens uses each table's "missing" row). The user state h is the last
position's output. An *order-agnostic head* predicts the next item's tokens: given h and any set S of
already committed (expert, token) pairs it returns the logits of every expert,

    logits(· | h, S) = Out( z + FF(LN(z)) ),   z = h + sum_{(m, t) in S} C[m, t]

and only the uncommitted experts' rows are used. Training draws commit subsets at random (the empty set
plus `subsets_per_position` uniformly sized random subsets per position) and minimises the cross-entropy
of the uncommitted experts' true tokens, so every decoding order is one the head was trained for.

Constrained decoding (`beam_search`). Only token tuples that name a real catalogue item can be produced:
after the first commit each beam carries the list of catalogue items consistent with its committed tokens
(an inverted index per expert), and an expert's allowed tokens are those of the beam's live candidates.
Scores are the model's log-probabilities (not renormalised over the allowed tokens, so a tuple's score
stays its probability under the head), summed over the steps of a path; beam width `beam` per path.
Items of the user's history are removed from the candidates (the ranker's protocol).

* fixed_order: one path, experts committed in order 0..M-1.
* dynamic paths: M paths; path p commits expert p first, then at every step each beam commits the
  uncommitted expert whose best allowed token is most probable (REG4Rec's confidence-based step order).
  Path scores are aggregated per item as the log of the mean over paths of the path probabilities
  (an item a path did not reach has probability 0 there).
* CORP (consistency-oriented pruning): a path is dropped when it reaches no valid item, or when fewer
  than `corp_min_agreement` of its top-`corp_top_k` items appear in the union of the other paths' top
  sets; the survivors are aggregated as above (when every path of a user would be dropped, all paths
  that reached an item are kept and the fallback is counted).

Items no kept path reached score -inf and rank after every reached item; ties count against the target
(`models.ranker.rank_of_target`, the ranker's Recall/NDCG@5/10/20 with history excluded).

Bad input (see `TokenCatalog`): items without MPQ tokens cannot be generated (counted; as inputs they use
the "missing" embeddings; a target without tokens ranks last); items sharing one tuple (the MPQ
de-duplication leaves a few when no free tuple was near) split the tuple's probability evenly, i.e. each
gets the path score minus log(#items sharing it), and they tie (counted); no MPQ column at all, or a
codebook version that differs between the tables (checked by `models.ranker_data.load_item_features`),
raises DataError.

PARS and MSRA (`align`): see the function's docstring.
"""

from __future__ import annotations

from models.configs import GenerativeConfig
from models.generative.align import (
    Credit,
    Example,
    ItemKind,
    align,
    alignment_examples,
    catalog_credit,
    dpo_loss,
    item_logprob,
    item_rewards,
    knowledge_credit,
    load_category_paths,
    load_item_kinds,
    mine_pairs,
    user_sequences,
)
from models.generative.catalog import TokenCatalog, build_catalog
from models.generative.decode import (
    aggregate,
    banned_matrix,
    beam_search,
    corp_keep,
    dense_scores,
    evaluate,
    score_modes,
)
from models.generative.model import (
    ALIGNED,
    DEFAULT_VARIANTS,
    INFERENCE_MODES,
    MODEL_VERSION,
    VARIANTS,
    GenerativeRecommender,
    random_commits,
    token_loss,
    version_of,
)
from models.generative.optim import StageResult
from models.generative.train import build_examples, finite, fit_variants, make_streams, train_base

__all__ = ["ALIGNED", "Credit", "DEFAULT_VARIANTS", "ItemKind", "knowledge_credit", "load_item_kinds", "GenerativeConfig", "Example", "align", "alignment_examples", "catalog_credit", "dpo_loss", "item_logprob", "item_rewards", "load_category_paths", "mine_pairs", "user_sequences", "TokenCatalog", "build_catalog", "aggregate", "banned_matrix", "beam_search", "corp_keep", "dense_scores", "evaluate", "score_modes", "INFERENCE_MODES", "MODEL_VERSION", "VARIANTS", "GenerativeRecommender", "random_commits", "token_loss", "version_of", "StageResult", "build_examples", "finite", "fit_variants", "make_streams", "train_base"]
