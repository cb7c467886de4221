"""Pure tensor functions: pairwise matrices, label masks, mining rules, loss and regulariser
formulas.

No state and no ``nn.Module`` here; the classes in :mod:`dmlkit.losses` and :mod:`dmlkit.miners`
are thin wrappers that check inputs and delegate to these functions.
"""

from .logsumexp import masked_logsumexp
from .losses import (
    circle_loss,
    contrastive_loss,
    generalized_lifted_structure_loss,
    lifted_structure_loss,
    margin,
    multi_similarity_loss,
    npairs_loss,
    ntxent_loss,
    otg_multi_similarity_per_anchor,
    soft_contrastive_loss,
    soft_contrastive_per_anchor,
    soft_weighted_triplet_loss,
    supcon_loss,
    zero_loss,
)
from .margin import margin_loss, triplet_pair_weights
from .masks import (
    PairIndices,
    PairWeights,
    batch_pair_weights,
    drop_self_pairs,
    label_masks,
    label_weights,
    pairs_per_anchor,
    tuple_to_pair_weights,
)
from .mining import (
    AdaptiveTolerances,
    adaptive_tolerances,
    asymmetric_mining_masks,
    batch_hard_triplets,
    pairs_from_masks,
)
from .pairwise import (
    cosine_similarity_matrix,
    dot_product_matrix,
    euclidean_distance_matrix,
    lp_distance_matrix,
    snr_distance_matrix,
    squared_euclidean_distance_matrix,
)
from .ranking import fastap_loss, soft_histograms, tuple_element_weights
from .regularizers import (
    center_invariant_terms,
    lp_norm_terms,
    nearest_similarity_terms,
    same_class_center_pairs,
    sparse_centers_terms,
    zero_mean_terms,
)
from .triplets import all_triplets_margin_loss, mine_triplets

__all__ = [
    "AdaptiveTolerances",
    "PairIndices",
    "PairWeights",
    "adaptive_tolerances",
    "all_triplets_margin_loss",
    "asymmetric_mining_masks",
    "batch_hard_triplets",
    "batch_pair_weights",
    "center_invariant_terms",
    "circle_loss",
    "contrastive_loss",
    "cosine_similarity_matrix",
    "dot_product_matrix",
    "drop_self_pairs",
    "euclidean_distance_matrix",
    "fastap_loss",
    "generalized_lifted_structure_loss",
    "label_masks",
    "label_weights",
    "lifted_structure_loss",
    "lp_distance_matrix",
    "lp_norm_terms",
    "margin",
    "margin_loss",
    "masked_logsumexp",
    "mine_triplets",
    "multi_similarity_loss",
    "nearest_similarity_terms",
    "npairs_loss",
    "ntxent_loss",
    "otg_multi_similarity_per_anchor",
    "pairs_from_masks",
    "pairs_per_anchor",
    "same_class_center_pairs",
    "snr_distance_matrix",
    "soft_contrastive_loss",
    "soft_contrastive_per_anchor",
    "soft_histograms",
    "soft_weighted_triplet_loss",
    "sparse_centers_terms",
    "squared_euclidean_distance_matrix",
    "supcon_loss",
    "triplet_pair_weights",
    "tuple_element_weights",
    "tuple_to_pair_weights",
    "zero_loss",
    "zero_mean_terms",
]
