"""Pipeline parallelism over the mesh axis 'stage': one SPMD program, any schedule, any layer split.

    schedules.py     the schedules as lockstep tick tables (gpipe, 1f1b, interleaved), their bubble counted
    stage_layout.py  which layers each stage holds: contiguous runs of any kinds, uneven where counts do not divide
    slot_state.py    the train state in the slot layout (resident slots + a pool split over 'stage') and checkpoints
    executor.py      the program: a `lax.scan` over the ticks inside a `shard_map` manual over 'stage', owning the
                     step's loss and gradients (embedding on the first virtual stage, head/MTP/loss on the last)

Every schedule is a tick table of the same program, so every schedule accepts uneven stages (the tiny config's
1 dense + 3 MoE layers over 2 or 4 stages). Training reaches it through `dsv3_jax.programs.Pipelined`, which the
Runtime picks whenever the mesh has more than one stage.

S = 4, M = 8, stages 0 and 3, one cell per tick (forward: the micro-batch digit; backward: letter A + m):

    gpipe        s0 0. 1. 2. 3. 4. 5. 6. 7. .. .. .. .. .. .. .H .G .F .E .D .C .B .A
                 s3 .. .. .. 0. 1. 2. 3. 4. 5. 6. 7. .H .G .F .E .D .C .B .A .. .. ..
    1f1b         s0 0. 1. 2. 3. 4. 5. 6A 7B .C .D .E .F .G .H
                 s3 .. .. .. 0A 1B 2C 3D 4E 5F 6G 7H .. .. ..
    interleaved  s0 0. 1. 2. 3. 0. 1. 2. 3. 4. 5. 6A 7B 4C 5D 6A 7B .C .D .E .F .G .H .E .F .G .H
                 s3 .. .. .. 0. 1. 2. 3. 0A 1B 2C 3D 4A 5B 6C 7D 4E 5F 6G 7H .E .F .G .H .. .. ..

Counted bubble (F 1, B 2; each tick as long as its busiest stage) and stage inputs held by stage 0
(`benchmarks/pipeline_schedules.py`):

    S   M   gpipe          1f1b           interleaved v=2
    2   4   20.0%, 4       20.0%, 3       11.1%, 5
    4   8   27.3%, 8       27.3%, 7       15.8%, 11
    16  32  31.9%, 32      31.9%, 31      19.0%, 47

DeepSeek-V3 over stage 16 x expert 64 x data 2 (`train.py --dry_run`, 32 micro-batches, seq 4096), per device:
no ghost parameters; params / grads / AdamW stored 6.5 / 6.5 / 13.0 GiB, pooled layers borrowed for the step
(with their gradient sums) 22.2 GiB (interleaved v=2: 29.6), activations 52.8 (gpipe) / 45.8 (1f1b) / 49.3 GiB
(interleaved), FLOP imbalance 1.213 (interleaved 1.460).
"""
