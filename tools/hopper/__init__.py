"""The static Hopper (sm_90) cost toolkit: compile-time predictions of the kernels' H200 speed, no GPU.

Commands (from the repository root):

* ``python -m tools.hopper.report --out DIR [--baseline FILE] [--write-baseline] [--recompile FILE] [--jobs N]``
  the cost report and its CI ratchet (:mod:`tools.hopper.report`);
* ``python -m tools.hopper.compile_sweep [--jobs N] [--filter SUBSTR] [--list]`` every kernel the ops
  launch, in every dtype and autotune config, compiled for sm_90 (:mod:`tools.hopper.compile_sweep`);
* ``python -m tools.hopper.time_ops --out DIR`` the report's ops timed on a real GPU beside their
  predictions (:mod:`tools.hopper.time_ops`);
* ``python -m tools.hopper.mfu`` nanoGPT-style model-FLOPs arithmetic, the sanity check beside the
  report (:mod:`tools.hopper.mfu`).

Modules, in the order the report uses them:

* ``ops`` (+ ``fused_ops``, ``cases``): ``REGISTRY``, the one list of ops: report cases with floors
  and goals, compile-sweep cases per dtype; ``cases`` holds ``OpCase``, ``Goal``, ``OpEntry`` and the
  inputs a case's launcher is called with; ``tutorial_gemm`` the calibration GEMM;
* ``launch_capture``: records every launch (and autotune config) a launcher makes on fake CUDA tensors;
* ``sm90``: the JIT's specialisation of a launch, compiled for sm_90; ``sass``: reads its SASS;
* ``trip_count``: K-loop trips from the kernel source; ``cost_model``: the lower bound;
* ``evaluate``: launches + analyses -> the report's objects; ``markdown``; ``ratchet``: the CI check;
* ``sweep``: the compile sweep's job list from the ops' launches, and one job's compile and verdict.

The command modules (``report``, ``compile_sweep``) unset ``TRITON_INTERPRET`` before anything
imports the kernels, which pick their autotune configs (and the interpreter) when imported; the
other modules change no environment, so tests import them next to interpreted kernels.
"""
