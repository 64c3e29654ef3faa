"""Studies: a grid of pruning x quantization mixtures on one model, each point evaluated and its
storage counted, resumable, run locally or as Ray tasks, and a report of the Pareto front.

    from pare.study import Study, StudySettings, build_grid
    points = build_grid("none; sparsegpt:0.5", "none; int4-g128", "prune-first,quant-first")
    Study("studies/x", StudySettings(model="..."), points).run()
"""

from pare.study.grid import ORDERS, Point, build_grid, parse_prune, parse_quant
from pare.study.pareto import pareto_front
from pare.study.point import StudySettings, run_point
from pare.study.run import Study, is_study, read_study

__all__ = ["ORDERS", "Point", "Study", "StudySettings", "build_grid", "is_study", "pareto_front", "parse_prune",
           "parse_quant", "read_study", "run_point"]
