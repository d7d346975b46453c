"""`mtl-bench`: the benchmarks of mtl_vision, one subcommand each.

    mtl-bench step experiment=invpt_nyud data.batch_size=2     # our Trainer step vs a plain PyTorch loop
    mtl-bench data --dataset nyud                              # samples/s per data-loading worker
    mtl-bench decoders --backbone resnet18 --size 224 288      # step time and peak memory per decoder
    mtl-bench balancers --steps 5                              # step time per balancing strategy
    mtl-bench boundary --images 20                             # the BSDS boundary benchmark's cost
    mtl-bench moe                                              # TaskMoE: many vs few experts

Every subcommand prints a table and, with `--json FILE`, writes its rows and settings as JSON.
Each lives in `mtl_vision/bench/<name>.py` with `add_arguments(parser)` and `run(args) -> Result`;
`mtl_vision.bench.cli` dispatches. Benchmarks print numbers; no test asserts a time.
"""
