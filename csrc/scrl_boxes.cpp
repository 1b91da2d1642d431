// SCRL's grid-based box sampler, the fast twin of fastdense/boxes.py (_sample_image).
//
// Every double operation below happens in the same order as in the Python reference, and the
// integers come from the same SplitMix64 stream per image, so both produce bit-identical boxes.
// setup.py builds with -ffp-contract=off so that no multiply-add gets fused behind our back.
#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "fastdense.h"

namespace py = pybind11;

namespace fastdense {
namespace {

class SplitMix64 {
  public:
    explicit SplitMix64(int64_t key) : state_(static_cast<uint64_t>(key)) {}

    // An integer in [low, high), by multiply-shift of the top 32 bits.
    int64_t randint(int64_t low, int64_t high) {
        state_ += 0x9E3779B97F4A7C15ULL;
        uint64_t z = state_;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        const uint64_t span = static_cast<uint64_t>(high - low);
        return low + static_cast<int64_t>(((z >> 32) * span) >> 32);
    }

  private:
    uint64_t state_;
};

struct Box {
    double x1, y1, x2, y2;
};

// One view's matrix entries: source = (sx * x + tx, sy * y + ty).
struct View {
    double sx, tx, sy, ty;
};

struct Options {
    double view_h, view_w;
    int64_t num_boxes;
    double min_size, iou_threshold;
    int64_t max_tries;
};

struct Sampled {
    Box box1, box2;
    bool rule_met;
};

// Python's int() of a finite double: truncation toward zero.
inline int64_t trunc_int(double v) { return static_cast<int64_t>(v); }

inline void overlap(double s1, double t1, double s2, double t2, double size, double& low, double& high) {
    low = std::max(std::min(t1, t1 + s1 * size), std::min(t2, t2 + s2 * size));
    high = std::min(std::max(t1, t1 + s1 * size), std::max(t2, t2 + s2 * size));
}

inline Box to_view(double x1, double y1, double x2, double y2, const View& v) {
    const double vx1 = (x1 - v.tx) / v.sx, vx2 = (x2 - v.tx) / v.sx;
    const double vy1 = (y1 - v.ty) / v.sy, vy2 = (y2 - v.ty) / v.sy;
    return {std::min(vx1, vx2), std::min(vy1, vy2), std::max(vx1, vx2), std::max(vy1, vy2)};
}

inline Box clip(const Box& b, double view_w, double view_h) {
    auto c = [](double v, double hi) { return std::min(std::max(v, 0.0), hi); };
    return {c(b.x1, view_w), c(b.y1, view_h), c(b.x2, view_w), c(b.y2, view_h)};
}

// A box in whole cells of the scaled grid.
struct GridBox {
    int64_t x1, y1, x2, y2;
};

// Exact IoU on the grid (the boxes' IoU in either view): Python's int / int, correctly rounded.
inline double grid_iou(const GridBox& a, const GridBox& b) {
    const int64_t inter = std::max<int64_t>(std::min(a.x2, b.x2) - std::max(a.x1, b.x1), 0) *
                          std::max<int64_t>(std::min(a.y2, b.y2) - std::max(a.y1, b.y1), 0);
    const int64_t uni = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter;
    return static_cast<double>(inter) / static_cast<double>(uni);
}

// Appends the image's boxes to `out` (nothing when the scaled overlap is too small).
void sample_image(const View& v1, const View& v2, int64_t key, const Options& o, std::vector<Sampled>& out) {
    double left, right, top, bottom;
    overlap(v1.sx, v1.tx, v2.sx, v2.tx, o.view_w, left, right);
    overlap(v1.sy, v1.ty, v2.sy, v2.ty, o.view_h, top, bottom);
    if (left >= right || top >= bottom) return;
    const double unit_x = std::max(std::abs(v1.sx), std::abs(v2.sx));
    const double unit_y = std::max(std::abs(v1.sy), std::abs(v2.sy));
    // Round half to even, like Python's round(), under the default rounding mode.
    const int64_t width = static_cast<int64_t>(std::nearbyint((right - left) / unit_x));
    const int64_t height = static_cast<int64_t>(std::nearbyint((bottom - top) / unit_y));
    if (o.min_size >= static_cast<double>(width) || o.min_size >= static_cast<double>(height)) return;
    const int64_t max_div_x = trunc_int(static_cast<double>(width) / o.min_size) + 1;
    const int64_t max_div_y = trunc_int(static_cast<double>(height) / o.min_size) + 1;
    const int64_t min_side = trunc_int(o.min_size);

    SplitMix64 stream(key);
    std::vector<GridBox> kept_on_grid;
    for (int64_t k = 0; k < o.num_boxes; ++k) {
        double src_x1 = 0, src_y1 = 0, src_x2 = 0, src_y2 = 0;
        Box box1{};
        GridBox on_grid{};
        bool rule_met = false;
        for (int64_t attempt = 0; attempt < o.max_tries; ++attempt) {
            const int64_t div_x = stream.randint(1, max_div_x);
            const int64_t div_y = stream.randint(1, max_div_y);
            const double cell_w = static_cast<double>(width) / static_cast<double>(div_x);
            const double cell_h = static_cast<double>(height) / static_cast<double>(div_y);
            const int64_t cell_x = stream.randint(0, div_x);
            const int64_t cell_y = stream.randint(0, div_y);
            const int64_t box_w = stream.randint(min_side, trunc_int(cell_w + 1));
            const int64_t box_h = stream.randint(min_side, trunc_int(cell_h + 1));
            const int64_t box_x = stream.randint(0, trunc_int(cell_w - static_cast<double>(box_w) + 1)) +
                                  trunc_int(static_cast<double>(cell_x) * cell_w);
            const int64_t box_y = stream.randint(0, trunc_int(cell_h - static_cast<double>(box_h) + 1)) +
                                  trunc_int(static_cast<double>(cell_y) * cell_h);

            src_x1 = left + static_cast<double>(box_x) * unit_x;
            src_x2 = src_x1 + static_cast<double>(box_w) * unit_x;
            src_y1 = top + static_cast<double>(box_y) * unit_y;
            src_y2 = src_y1 + static_cast<double>(box_h) * unit_y;
            box1 = to_view(src_x1, src_y1, src_x2, src_y2, v1);
            on_grid = {box_x, box_y, box_x + box_w, box_y + box_h};
            if (k == 0 || o.iou_threshold >= 1.0) {
                rule_met = true;
                break;
            }
            double max_iou = 0.0;
            for (const GridBox& earlier : kept_on_grid) max_iou = std::max(max_iou, grid_iou(on_grid, earlier));
            rule_met = max_iou < o.iou_threshold;
            if (rule_met) break;
        }
        const Box box2 = to_view(src_x1, src_y1, src_x2, src_y2, v2);
        out.push_back({clip(box1, o.view_w, o.view_h), clip(box2, o.view_w, o.view_h), rule_met});
        kept_on_grid.push_back(on_grid);
    }
}

py::tuple sample_scrl_boxes(py::array_t<double, py::array::c_style | py::array::forcecast> params,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> keys, double view_h,
                            double view_w, int64_t num_boxes, double min_size, double iou_threshold,
                            int64_t max_tries) {
    if (params.ndim() != 3 || params.shape(1) != 2 || params.shape(2) != 4)
        throw std::invalid_argument("params must have shape [B, 2, 4] (sx, tx, sy, ty per view)");
    const int64_t batch = params.shape(0);
    if (keys.ndim() != 1 || keys.shape(0) != batch) throw std::invalid_argument("keys must have shape [B]");
    if (num_boxes < 1 || max_tries < 1 || !(min_size >= 1.0) || !(view_h > 0) || !(view_w > 0))
        throw std::invalid_argument("num_boxes, max_tries, min_size and view sizes must be positive (min_size >= 1)");
    const Options o{view_h, view_w, num_boxes, min_size, iou_threshold, max_tries};
    const double* p = params.data();
    const int64_t* k = keys.data();

    std::vector<Sampled> boxes;
    std::vector<int64_t> counts(batch);
    std::vector<int64_t> owner;
    {
        py::gil_scoped_release release;
        boxes.reserve(static_cast<size_t>(batch * num_boxes));
        for (int64_t b = 0; b < batch; ++b) {
            const double* q = p + b * 8;
            const size_t before = boxes.size();
            sample_image({q[0], q[1], q[2], q[3]}, {q[4], q[5], q[6], q[7]}, k[b], o, boxes);
            counts[b] = static_cast<int64_t>(boxes.size() - before);
            owner.insert(owner.end(), boxes.size() - before, b);
        }
    }

    const auto n = static_cast<py::ssize_t>(boxes.size());
    py::array_t<double> rois1({n, py::ssize_t(5)}), rois2({n, py::ssize_t(5)});
    py::array_t<int64_t> count_array(static_cast<py::ssize_t>(batch));
    py::array_t<bool> met(n);
    double* r1 = rois1.mutable_data();
    double* r2 = rois2.mutable_data();
    bool* m = met.mutable_data();
    for (py::ssize_t i = 0; i < n; ++i) {
        const Sampled& s = boxes[static_cast<size_t>(i)];
        const double b = static_cast<double>(owner[static_cast<size_t>(i)]);
        const double row1[5] = {b, s.box1.x1, s.box1.y1, s.box1.x2, s.box1.y2};
        const double row2[5] = {b, s.box2.x1, s.box2.y1, s.box2.x2, s.box2.y2};
        std::copy(row1, row1 + 5, r1 + 5 * i);
        std::copy(row2, row2 + 5, r2 + 5 * i);
        m[i] = s.rule_met;
    }
    std::copy(counts.begin(), counts.end(), count_array.mutable_data());
    return py::make_tuple(rois1, rois2, count_array, met);
}

}  // namespace

void register_scrl_boxes(py::module_& m) {
    m.def("sample_scrl_boxes", &sample_scrl_boxes, py::arg("params"), py::arg("keys"), py::arg("view_h"),
          py::arg("view_w"), py::arg("num_boxes"), py::arg("min_size"), py::arg("iou_threshold"), py::arg("max_tries"),
          "SCRL boxes for B view pairs. params [B, 2, 4] float64 (sx, tx, sy, ty per view), keys [B] int64. "
          "Returns (rois1 [K, 5], rois2 [K, 5], counts [B], iou_rule_met [K]) as NumPy arrays; "
          "see fastdense.boxes.sample_scrl_boxes.");
}

}  // namespace fastdense
