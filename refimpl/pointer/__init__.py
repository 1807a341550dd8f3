"""Chapter 1: pointer networks and the attention model for routing, one concern per module.

- ``geometry``: input checks, tour lengths, the convex hull and simple polygons;
- ``held_karp``: exact TSP tours (the supervised labels and the optimum gaps are measured to);
- ``data``: the tasks' instances and labels (sort, hull, TSP) and the labelled TSP pool;
- ``network``: the Pointer Network (Vinyals et al. 2015) and the Read-Process-Write encoder;
- ``decoding``: greedy and beam search over valid outputs (``solve``, for both models);
- ``metrics``: accuracy, hull coverage and optimality gap on fresh instances (``evaluate``);
- ``supervised``: teacher-forced training on exact labels;
- ``attention``: the attention model (Kool et al. 2019) with multi-start decoding (POMO);
- ``reinforce``: training without labels, REINFORCE with a rollout baseline and POMO;
- ``checkpoints``: the committed checkpoints and records (``load``, ``record_of``);
- ``__main__``: ``python -m refimpl.pointer train|rl|evaluate``.
"""
from refimpl.pointer.attention import (SYMMETRIES, AttentionConfig, AttentionModel, augment,
                                       beam_tours, best_tours, check_starts, closed_length,
                                       context_query, encode_cities, glimpse,
                                       next_city_log_probs, rollout, solve_attention,
                                       tour_log_prob, visited_mask)
from refimpl.pointer.checkpoints import (ASSETS, checkpoint_name, committed, load, record_of,
                                         save)
from refimpl.pointer.data import (IGNORE, INPUT_ORDERS, OUTPUT_ORDERS, STOP, TASKS, TEST_SEED,
                                  VALIDATION_SEED, TSPPool, angle_order, check_task_args,
                                  make_batch, tsp_instances)
from refimpl.pointer.decoding import beam_select, best_path, chosen_slots, hull_allowed, solve
from refimpl.pointer.geometry import (canonical_tour, check_indices, check_points, check_tour,
                                      convex_hull, edge_crosses, is_simple_polygon, polygon_area,
                                      tour_length)
from refimpl.pointer.held_karp import (MAX_HELD_KARP_N, check_held_karp_points, held_karp,
                                       held_karp_table, held_karp_tour)
from refimpl.pointer.metrics import evaluate
from refimpl.pointer.network import (PointerConfig, PointerLayers, PointerNet, PointerSteps,
                                     check_pointer_args, check_pointer_config, check_targets,
                                     pointer_log_probs, process_set, teacher_forcing_mask)
from refimpl.pointer.reinforce import RLConfig, pomo_loss, reinforce_loss, train_rl
from refimpl.pointer.supervised import TrainConfig, check_train_config, train
