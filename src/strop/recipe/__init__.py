"""What a run is, decided and counted before it runs: the dtypes it computes in, the attention
and the lean activations and fused loss it uses (decide.py, with strop.precision below it),
its FLOPs per token (math.py, shape.py) and the peak FLOPs of the device it runs on
(hardware.py).

Below both strop.train and strop.plan: the loop builds from these decisions and `strop plan`
estimates from the same ones, so the two cannot disagree about a run. Nothing here imports
train/ or plan/, and nothing here looks at the machine unless handed what it found
(strop.device.DeviceCaps).
"""
