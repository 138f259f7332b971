import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

_cache = {}


def ort_roi_align(x_nchw, rois, batch, ph, pw, scale, sr, aligned, mode="avg"):
    key = (ph, pw, float(scale), sr, aligned, mode, x_nchw.dtype.str)
    if key not in _cache:
        dt = TensorProto.DOUBLE if x_nchw.dtype == np.float64 else TensorProto.FLOAT
        node = helper.make_node(
            "RoiAlign",
            ["X", "rois", "batch_indices"],
            ["Y"],
            output_height=ph,
            output_width=pw,
            sampling_ratio=sr,
            spatial_scale=float(scale),
            mode=mode,
            coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        )
        g = helper.make_graph(
            [node],
            "g",
            [
                helper.make_tensor_value_info("X", dt, None),
                helper.make_tensor_value_info("rois", dt, None),
                helper.make_tensor_value_info("batch_indices", TensorProto.INT64, None),
            ],
            [helper.make_tensor_value_info("Y", dt, None)],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
        m.ir_version = 8
        _cache[key] = ort.InferenceSession(
            m.SerializeToString(), providers=["CPUExecutionProvider"]
        )
    return _cache[key].run(
        None, {"X": x_nchw, "rois": rois, "batch_indices": batch.astype(np.int64)}
    )[0]
