"""Placement optimizer: hardware profiles, latency model, simulator and search -> Plan.

Pure Python (stdlib, msgspec, PyYAML): no Ray, no torch, no numpy, so `tandem plan` runs anywhere.
"""
from .calibrate import CalibratedProfile, ProfileSample, fit_profile, load_profile, save_profile
from .hardware import PROFILES, HardwareProfile, get_profile
from .model_spec import ModelSpec, load_model
from .plan import ColocatedBaseline, InstancePlacement, PhasePlan, Plan, SearchResult, StagePlacement
from .problem import Problem, SpecError, load_problem, problem_from_dict
from .search import PlacementError, search

__all__ = [
    "PROFILES", "CalibratedProfile", "ColocatedBaseline", "HardwareProfile", "InstancePlacement",
    "ModelSpec", "PhasePlan", "PlacementError", "Plan", "Problem", "ProfileSample", "SearchResult",
    "SpecError", "StagePlacement", "fit_profile", "get_profile", "load_model", "load_problem",
    "load_profile", "problem_from_dict", "save_profile", "search",
]
