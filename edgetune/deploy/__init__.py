"""Deploy a bundle to a device: a C project per target, its budget check, the build, the file formats.

    write_target_project(bundle, "cortex-m4")   # OUT/cortex-m4/: model C + runtime + board + Makefile
    build(bundle)                               # make with the target's toolchain
    edgetune.simulate.simulate(bundle, ...)     # run it in QEMU on a corrupted stream
"""
from edgetune.deploy.budget import MemoryBudget, analytic_budget, check_budget, firmware_budget
from edgetune.deploy.build import Built, build, build_project, find_projects
from edgetune.deploy.project import (STATE_FILE, TargetProject, backbone_macs, load_initial_state,
                                     save_initial_state, write_target_project)
from edgetune.deploy.streams import StateEntry, read_results, read_state, write_stream

__all__ = ["Built", "MemoryBudget", "STATE_FILE", "StateEntry", "TargetProject", "analytic_budget", "backbone_macs",
           "build", "build_project", "check_budget", "find_projects", "firmware_budget", "load_initial_state",
           "read_results", "read_state", "save_initial_state", "write_stream", "write_target_project"]
