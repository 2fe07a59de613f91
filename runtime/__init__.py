"""Real execution of lina-sim policies on torch.distributed (gloo on CPU, NCCL on GPU).

Lowest first (a module imports only those above it):

- ``comm``: clock, scheduler thread, rank exchange, gradient sync, step communicators;
- ``dist``: process-group setup (init, world-size checks, ep/dp groups, destroy);
- ``context``: what a run mode's rank function gets (``RankContext``);
- ``moe``, ``ep_moe``: the MoE transformer, and its expert-parallel cut;
- ``mode``: the interface of a scenario kind run for real (``Mode``);
- ``compute_profile``: compute ops timed without the network (validation's step 2);
- ``train``, ``infer``: the training and inference modes;
- ``scenario``: the ``scenario`` run mode, dispatching through ``MODES`` by kind;
- ``selftest``, ``calibrate``: run modes that check and measure the cluster;
- ``testbed``, ``launch``, ``entry``, ``cli``: the emulated cluster, the rank launcher,
  the rank entry point (``ENTRIES``: the run modes) and ``lina-run``;
- ``testbed_profile``, ``compare``, ``validate``, ``validate_command`` (figures: plots.validation):
  ``lina-sim validate`` (calibrate, profile, simulate, measure, compare);
- ``record``: routing traces recorded from a real MoE.
"""
