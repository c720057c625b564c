// The plane kernels of freeu_cpu.cpp, included there once per instruction set inside
// `namespace FREEU_CPU_NS` (no include guard on purpose). Not a public header.
//
// Skip plane, two sweeps (docs/design.md section 2 in real arithmetic):
//   sweep 1, row y:  Vc_i += cos(2 pi ky_i y / H) h[y],  Vs_i += sin(...) h[y]   (vectors of W)
//   per plane:       Scc_ij = Vc_i . cos_x_j,  Scs_ij = Vc_i . sin_x_j,  Ssc_ij = Vs_i . cos_x_j,  Sss_ij = Vs_i . sin_x_j
//                    Qr = w g (Scc - Sss),  Qi = w g (Ssc + Scs)                    (g = (s - g_hi) / (H W))
//                    A_i = sum_j Qr_ij cos_x_j + Qi_ij sin_x_j,  B_i = sum_j Qi_ij cos_x_j - Qr_ij sin_x_j
//   sweep 2, row y:  out[y] = g_hi h[y] + sum_i cos(2 pi ky_i y / H) A_i + sin(...) B_i
// so the per-element work is 2 ny multiply-adds per sweep with no reduction; the horizontal sums
// happen once per plane. The common bands (1 or 2 rows of frequencies: threshold 1) on planes with
// contiguous rows take skip_plane_strips, which keeps V in registers and reads h again in sweep 2 (the
// plane is still in L1/L2: one read from memory); any other plane takes skip_plane_rows, which holds
// the plane in a float32 buffer between the sweeps.

namespace FREEU_CPU_NS {

template <class T> inline const T* plane_at(const FreeuView& v, int64_t n, int64_t c, int64_t f) {
    return static_cast<const T*>(v.data) + n * v.stride[0] + c * v.stride[1] + f * v.stride[2];
}
template <class T> inline T* plane_at_mut(const FreeuView& v, int64_t n, int64_t c, int64_t f) {
    return static_cast<T*>(v.data) + n * v.stride[0] + c * v.stride[1] + f * v.stride[2];
}

template <class T> inline void load_row(const T* plane, const FreeuView& v, int64_t y, int64_t w, float* dst) {
    const T* row = plane + y * v.stride[3];
    const int64_t sw = v.stride[4];
    if (sw == 1 || w == 1) {
#pragma omp simd
        for (int64_t x = 0; x < w; ++x) dst[x] = to_float(row[x]);
    } else {
        for (int64_t x = 0; x < w; ++x) dst[x] = to_float(row[x * sw]);
    }
}

template <class T> inline void store_row(T* plane, const FreeuView& v, int64_t y, int64_t w, const float* src) {
    T* row = plane + y * v.stride[3];
    const int64_t sw = v.stride[4];
    if (sw == 1 || w == 1) {
#pragma omp simd
        for (int64_t x = 0; x < w; ++x) row[x] = from_float<T>(src[x]);
    } else {
        for (int64_t x = 0; x < w; ++x) row[x * sw] = from_float<T>(src[x]);
    }
}

// A whole plane into the float32 buffer (rows of W), or back: one flat loop when the plane is contiguous.
template <class T> inline void load_plane(const T* plane, const FreeuView& v, int64_t h, int64_t w, float* dst) {
    if ((v.stride[4] == 1 || w == 1) && (v.stride[3] == w || h == 1)) {
        const int64_t count = h * w;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) dst[i] = to_float(plane[i]);
        return;
    }
    for (int64_t y = 0; y < h; ++y) load_row(plane, v, y, w, dst + y * w);
}

template <class T> inline void store_plane(T* plane, const FreeuView& v, int64_t h, int64_t w, const float* src) {
    if ((v.stride[4] == 1 || w == 1) && (v.stride[3] == w || h == 1)) {
        const int64_t count = h * w;
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) plane[i] = from_float<T>(src[i]);
        return;
    }
    for (int64_t y = 0; y < h; ++y) store_row(plane, v, y, w, src + y * w);
}

// Row pitch of the x twiddle tables (Plan::cos_x, sin_x): W rounded up to whole 16-lane strips, zero-padded.
inline int64_t padded(int64_t w) { return (w + 15) / 16 * 16; }

// Per-thread buffers, sized once per call.
// Sized on first use: the common paths (contiguous rows or channels_last, threshold 1) need none of them.
struct Scratch {
    explicit Scratch(const FreeuFusedConcatArgs& call) : args(call) {}
    float* row() { return sized(row_buffer, size_t(args.w)); }                    // one row of W
    float* plane() { return sized(plane_buffer, size_t(args.h) * size_t(args.w)); }  // H x W
    float* moment_rows() { return sized(moment_buffer, 4 * size_t(args.ny) * size_t(args.w)); }  // vc|vs|a|b

  private:
    static float* sized(std::vector<float>& buffer, size_t count) {
        if (buffer.size() < count) buffer.resize(count);
        return buffer.data();
    }
    const FreeuFusedConcatArgs& args;
    std::vector<float> row_buffer, plane_buffer, moment_buffer;
};

// One register of float lanes as a GCC vector: 16 (AVX-512), 8 (AVX2) or 4 (SSE2, and the portable
// copy: NEON and most other SIMD units are 128 bits wide), FREEU_CPU_LANES, set by freeu_cpu.cpp per copy.
// Accumulators declared as such stay in registers across a loop, which the compiler does not do for
// arrays. The vector must be exactly one register: GCC lowers a vector wider than the target's registers
// through the stack (a 16-lane vector in the AVX2 copy stored every broadcast and partial sum to memory
// and ran 3x to 11x slower than the AVX-512 copy, objdump of the hot loops).
constexpr int kLanes = FREEU_CPU_LANES;
static_assert(kLanes == 4 || kLanes == 8 || kLanes == 16, "FREEU_CPU_LANES: 4, 8 or 16");
typedef float Lanes __attribute__((vector_size(4 * kLanes)));
typedef uint32_t LanesU32 __attribute__((vector_size(4 * kLanes)));
typedef uint16_t LanesU16 __attribute__((vector_size(2 * kLanes)));
typedef _Float16 LanesF16 __attribute__((vector_size(2 * kLanes)));

inline Lanes load_lanes(const float* p) {
    Lanes v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline Lanes load_lanes(const Bf16* p) {
    LanesU16 bits;
    std::memcpy(&bits, p, sizeof bits);
    const LanesU32 wide = __builtin_convertvector(bits, LanesU32) << 16;
    Lanes v;
    std::memcpy(&v, &wide, sizeof v);
    return v;
}
inline Lanes load_lanes(const _Float16* p) {
    LanesF16 h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, Lanes);
}
inline void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }
inline void store_lanes(Bf16* p, Lanes v) {
    LanesU32 u;
    std::memcpy(&u, &v, sizeof u);
    const LanesU32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    const LanesU32 quiet_nan = (u >> 16) | 0x40u;
    const LanesU16 bits = __builtin_convertvector(v != v ? quiet_nan : rounded, LanesU16);
    std::memcpy(p, &bits, sizeof bits);
}
inline void store_lanes(_Float16* p, Lanes v) {
    const LanesF16 h = __builtin_convertvector(v, LanesF16);
    std::memcpy(p, &h, sizeof h);
}

// The first `lanes` (< kLanes) elements, zeros after them; and the way back. Through a small buffer, so
// nothing past the row is touched; the common widths are fixed-size copies the compiler inlines.
template <class T> inline void copy_few(T* dst, const T* src, int count) {
    if (kLanes > 8 && count == 8) {
        std::memcpy(dst, src, 8 * sizeof(T));
    } else if (kLanes > 4 && count == 4) {
        std::memcpy(dst, src, 4 * sizeof(T));
    } else {
        std::memcpy(dst, src, size_t(count) * sizeof(T));
    }
}
template <class T> inline Lanes load_partial(const T* p, int lanes) {
    T tmp[kLanes] = {};
    copy_few(tmp, p, lanes);
    return load_lanes(tmp);
}
template <class T> inline void store_partial(T* p, Lanes v, int lanes) {
    T tmp[kLanes];
    store_lanes(tmp, v);
    copy_few(p, tmp, lanes);
}

// 2 kLanes bfloat16 values read as kLanes 32-bit words: the even elements are the words shifted up by 16 bits,
// the odd ones the words with their low half cleared. No shuffle at all (converting kLanes values to kLanes
// lanes costs several), so bfloat16 loops go 2 kLanes columns at a time with lanes in (even, odd) order.
inline void load_pair(const Bf16* p, Lanes& even, Lanes& odd) {
    LanesU32 words;
    std::memcpy(&words, p, sizeof words);
    const LanesU32 e = words << 16, o = words & 0xffff0000u;
    std::memcpy(&even, &e, sizeof even);
    std::memcpy(&odd, &o, sizeof odd);
}
// The way back: each value rounded to nearest even (NaN kept quiet) and the halves merged into words.
inline void store_pair(Bf16* p, Lanes even, Lanes odd) {
    LanesU32 ue, uo;
    std::memcpy(&ue, &even, sizeof ue);
    std::memcpy(&uo, &odd, sizeof uo);
    const LanesU32 low = even != even ? (ue | 0x400000u) >> 16 : (ue + 0x7fffu + ((ue >> 16) & 1u)) >> 16;
    const LanesU32 high = odd != odd ? (uo | 0x400000u) & 0xffff0000u : (uo + 0x7fffu + ((uo >> 16) & 1u)) & 0xffff0000u;
    const LanesU32 words = low | high;
    std::memcpy(p, &words, sizeof words);
}

// y = x * scale over n contiguous elements: kLanes at a time (bfloat16: 2 kLanes), then the tail.
template <class T> inline void scale_contiguous(const T* in, T* out, int64_t n, float scale) {
    int64_t x = 0;
    if constexpr (std::is_same_v<T, Bf16>) {
        for (; x + 2 * kLanes <= n; x += 2 * kLanes) {
            Lanes even, odd;
            load_pair(in + x, even, odd);
            store_pair(out + x, even * scale, odd * scale);
        }
    }
    for (; x + kLanes <= n; x += kLanes) store_lanes(out + x, load_lanes(in + x) * scale);
    for (; x < n; ++x) out[x] = from_float<T>(to_float(in[x]) * scale);
}

template <class T> void backbone_plane(const Plan& p, int64_t n, int64_t c, int64_t f, Scratch& scratch) {
    const FreeuFusedConcatArgs& a = *p.a;
    const T* src = plane_at<T>(a.x, n, c, f);
    T* dst = plane_at_mut<T>(a.out_x, n, c, f);
    const bool scaled = c >= a.window_start && c < a.window_stop;
    const bool mapped = scaled && a.version == 2;
    const bool flat = (a.w == 1 || (a.x.stride[4] == 1 && a.out_x.stride[4] == 1)) &&
                      (a.h == 1 || (a.x.stride[3] == a.w && a.out_x.stride[3] == a.w));
    if (flat && !mapped) {  // the whole plane as one contiguous run
        if (scaled) {
            scale_contiguous(src, dst, a.h * a.w, p.b);
        } else {
            std::memcpy(dst, src, sizeof(T) * size_t(a.h * a.w));
        }
        return;
    }
    float* row = scratch.row();
    for (int64_t y = 0; y < a.h; ++y) {
        if (!scaled) {  // outside the window: a bit-exact copy
            const T* in = src + y * a.x.stride[3];
            T* out = dst + y * a.out_x.stride[3];
            if ((a.x.stride[4] == 1 && a.out_x.stride[4] == 1) || a.w == 1) {
                std::memcpy(out, in, sizeof(T) * size_t(a.w));
            } else {
                for (int64_t x = 0; x < a.w; ++x) out[x * a.out_x.stride[4]] = in[x * a.x.stride[4]];
            }
            continue;
        }
        load_row(src, a.x, y, a.w, row);
        if (mapped) {
            const float* map = a.scale_map + n * a.map_stride[0] + f * a.map_stride[1] + y * a.map_stride[2];
            const int64_t ms = a.map_stride[3];
            for (int64_t x = 0; x < a.w; ++x) row[x] *= map[x * ms];
        } else {
            const float b = p.b;
#pragma omp simd
            for (int64_t x = 0; x < a.w; ++x) row[x] *= b;
        }
        store_row(dst, a.out_x, y, a.w, row);
    }
}

// Sweep 1 of one row: keep it, and add it into the column moments (NY > 0: fixed count, fused loop).
template <int NY> inline void accumulate_row(const float* h, int64_t w, const float* cy, const float* sy, float* vc,
                                             float* vs, int ny) {
    if constexpr (NY > 0) {
#pragma omp simd
        for (int64_t x = 0; x < w; ++x) {
            const float v = h[x];
            for (int i = 0; i < NY; ++i) {
                vc[i * w + x] += cy[i] * v;
                vs[i * w + x] += sy[i] * v;
            }
        }
    } else {
        for (int i = 0; i < ny; ++i) {
            const float c = cy[i], s = sy[i];
            float* vci = vc + i * w;
            float* vsi = vs + i * w;
#pragma omp simd
            for (int64_t x = 0; x < w; ++x) {
                vci[x] += c * h[x];
                vsi[x] += s * h[x];
            }
        }
    }
}

// Sweep 2 of one row, in place: h = g_hi h + sum_i cy_i A_i + sy_i B_i.
template <int NY> inline void update_row(float* h, int64_t w, float g, const float* cy, const float* sy,
                                         const float* a, const float* b, int ny) {
    if constexpr (NY > 0) {
#pragma omp simd
        for (int64_t x = 0; x < w; ++x) {
            float acc = g * h[x];
            for (int i = 0; i < NY; ++i) acc += cy[i] * a[i * w + x] + sy[i] * b[i * w + x];
            h[x] = acc;
        }
    } else {
#pragma omp simd
        for (int64_t x = 0; x < w; ++x) h[x] *= g;
        for (int i = 0; i < ny; ++i) {
            const float c = cy[i], s = sy[i];
            const float* ai = a + i * w;
            const float* bi = b + i * w;
#pragma omp simd
            for (int64_t x = 0; x < w; ++x) h[x] += c * ai[x] + s * bi[x];
        }
    }
}

inline float dot(const float* u, const float* v, int64_t w) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t x = 0; x < w; ++x) acc += u[x] * v[x];
    return acc;
}

// The masked coefficients of a plane from its column moments vc, vs (ny x W each), folded into the
// update's coefficient rows ra, rb (ny x W each). Twiddle rows that are identically zero (the sine of
// frequency 0, and of the Nyquist frequency of an even size: twiddles() makes them exact zeros) are
// skipped: their moments are zero.
inline void coefficient_rows(const Plan& p, int ny, int nx, int64_t W, const float* vc, const float* vs, float* ra,
                             float* rb) {
    std::fill(ra, ra + size_t(ny) * W, 0.f);
    std::fill(rb, rb + size_t(ny) * W, 0.f);
    for (int i = 0; i < ny; ++i) {
        const float* vci = vc + i * W;
        const float* vsi = vs + i * W;
        const bool sin_y = p.sin_y_nonzero[size_t(i)];
        for (int j = 0; j < nx; ++j) {
            const double w = double(p.weight[size_t(i) * nx + j]) * double(p.s_gain);
            if (w == 0.0) continue;
            const float* cx = p.cos_x.data() + size_t(j) * padded(W);
            const float* sx = p.sin_x.data() + size_t(j) * padded(W);
            const bool sin_x = p.sin_x_nonzero[size_t(j)];
            const double scc = dot(vci, cx, W);
            const double scs = sin_x ? dot(vci, sx, W) : 0.0;
            const double ssc = sin_y ? dot(vsi, cx, W) : 0.0;
            const double sss = sin_y && sin_x ? dot(vsi, sx, W) : 0.0;
            const float qr = float(w * (scc - sss)), qi = float(w * (ssc + scs));
            float* ai = ra + i * W;
            float* bi = rb + i * W;
#pragma omp simd
            for (int64_t x = 0; x < W; ++x) {
                ai[x] += qr * cx[x] + qi * sx[x];
                bi[x] += qi * cx[x] - qr * sx[x];
            }
        }
    }
}

// The sum of the lanes as a halving tree (log2(kLanes) vector adds, then one scalar add per level left),
// in a fixed order per copy.
inline float horizontal_sum(Lanes v) {
    float lane[kLanes];
    std::memcpy(lane, &v, sizeof lane);
    for (int half = kLanes / 2; half >= 1; half /= 2)
        for (int i = 0; i < half; ++i) lane[i] += lane[i + half];
    return lane[0];
}

// Skip plane whose rows are contiguous in x (input and output), for a band of NY > 0 rows of
// frequencies. The plane is walked in column strips of kLanes: sweep 1 keeps a strip's column moments
// (Vc_i, Vs_i) in registers over all its rows and folds them into the (i, j) moment lanes right away;
// the horizontal sums happen once per plane; sweep 2 forms the strip's update coefficients (A_i, B_i)
// from the twiddles, reads the strip's rows again (from cache) and writes the output rows directly. A
// last strip narrower than kLanes is loaded zero-padded and stored through a small buffer.
// LAST_SINE_ZERO: the band's last frequency row is ky = 0 (every threshold-1 band), whose sine row is
// identically zero; its sine moments and sine update terms are then left out at compile time.
template <class T, int NY, bool LAST_SINE_ZERO> void skip_plane_strips(const Plan& p, const T* src, T* dst) {
    const FreeuFusedConcatArgs& a = *p.a;
    const int64_t H = a.h, W = a.w, src_row = a.skip.stride[3], dst_row = a.out_skip.stride[3];
    const int nx = p.nx;
    const float* cos_y = p.cos_y.data();
    const float* sin_y = p.sin_y.data();
    const float* cos_x = p.cos_x.data();
    const float* sin_x = p.sin_x.data();
    // moments[i][j] lanes: Scc, Scs, Ssc, Sss partial sums.
    Lanes moments[NY][kMaxFrequencies][4];
    for (int i = 0; i < NY; ++i)
        for (int j = 0; j < nx; ++j)
            for (int k = 0; k < 4; ++k) moments[i][j][k] = Lanes{};
    const int64_t pitch = padded(W);
    // bfloat16: whole blocks of 2 kLanes columns as (even, odd) lane pairs (load_pair); the rest in strips.
    const int64_t pairs_end = std::is_same_v<T, Bf16> ? W / (2 * kLanes) * (2 * kLanes) : 0;
    if constexpr (std::is_same_v<T, Bf16>) {
        for (int64_t x0 = 0; x0 < pairs_end; x0 += 2 * kLanes) {
            Lanes acc_c[2][NY] = {}, acc_s[2][NY] = {};
            for (int64_t y = 0; y < H; ++y) {
                Lanes v[2];
                load_pair(src + y * src_row + x0, v[0], v[1]);
                for (int i = 0; i < NY; ++i) {
                    const float c = cos_y[i * H + y], sn = sin_y[i * H + y];
                    for (int half = 0; half < 2; ++half) {
                        acc_c[half][i] += c * v[half];
                        if (!(LAST_SINE_ZERO && i == NY - 1)) acc_s[half][i] += sn * v[half];
                    }
                }
            }
            for (int j = 0; j < nx; ++j) {
                const bool sine_x = p.sin_x_nonzero[size_t(j)];
                for (int half = 0; half < 2; ++half) {
                    const Lanes cx = load_lanes(p.cos_x_pairs.data() + j * pitch + x0 + half * kLanes);
                    const Lanes sx = load_lanes(p.sin_x_pairs.data() + j * pitch + x0 + half * kLanes);
                    for (int i = 0; i < NY; ++i) {
                        const bool sine_y = !(LAST_SINE_ZERO && i == NY - 1);
                        moments[i][j][0] += acc_c[half][i] * cx;
                        if (sine_x) moments[i][j][1] += acc_c[half][i] * sx;
                        if (sine_y) moments[i][j][2] += acc_s[half][i] * cx;
                        if (sine_x && sine_y) moments[i][j][3] += acc_s[half][i] * sx;
                    }
                }
            }
        }
    }
    for (int64_t x0 = pairs_end; x0 < W; x0 += kLanes) {
        const int lanes = int(std::min<int64_t>(kLanes, W - x0));
        Lanes acc_c[NY] = {}, acc_s[NY] = {};
        for (int64_t y = 0; y < H; ++y) {
            const T* in = src + y * src_row + x0;
            const Lanes v = lanes == kLanes ? load_lanes(in) : load_partial(in, lanes);
            for (int i = 0; i < NY; ++i) {
                acc_c[i] += cos_y[i * H + y] * v;
                if (!(LAST_SINE_ZERO && i == NY - 1)) acc_s[i] += sin_y[i * H + y] * v;
            }
        }
        for (int j = 0; j < nx; ++j) {
            const Lanes cx = load_lanes(cos_x + j * pitch + x0), sx = load_lanes(sin_x + j * pitch + x0);
            const bool sine_x = p.sin_x_nonzero[size_t(j)];
            for (int i = 0; i < NY; ++i) {
                const bool sine_y = !(LAST_SINE_ZERO && i == NY - 1);
                moments[i][j][0] += acc_c[i] * cx;
                if (sine_x) moments[i][j][1] += acc_c[i] * sx;
                if (sine_y) moments[i][j][2] += acc_s[i] * cx;
                if (sine_x && sine_y) moments[i][j][3] += acc_s[i] * sx;
            }
        }
    }
    float qr[NY][kMaxFrequencies], qi[NY][kMaxFrequencies];
    for (int i = 0; i < NY; ++i) {
        for (int j = 0; j < nx; ++j) {
            const double w = double(p.weight[size_t(i) * nx + j]) * double(p.s_gain);
            const bool sine_x = p.sin_x_nonzero[size_t(j)], sine_y = !(LAST_SINE_ZERO && i == NY - 1);
            const double scc = horizontal_sum(moments[i][j][0]);
            const double scs = sine_x ? horizontal_sum(moments[i][j][1]) : 0.0;
            const double ssc = sine_y ? horizontal_sum(moments[i][j][2]) : 0.0;
            const double sss = sine_x && sine_y ? horizontal_sum(moments[i][j][3]) : 0.0;
            qr[i][j] = float(w * (scc - sss));
            qi[i][j] = float(w * (ssc + scs));
        }
    }
    const float g = p.high_gain;
    if constexpr (std::is_same_v<T, Bf16>) {
        for (int64_t x0 = 0; x0 < pairs_end; x0 += 2 * kLanes) {
            Lanes ca[2][NY] = {}, cb[2][NY] = {};
            for (int j = 0; j < nx; ++j) {
                for (int half = 0; half < 2; ++half) {
                    const Lanes cx = load_lanes(p.cos_x_pairs.data() + j * pitch + x0 + half * kLanes);
                    const Lanes sx = load_lanes(p.sin_x_pairs.data() + j * pitch + x0 + half * kLanes);
                    for (int i = 0; i < NY; ++i) {
                        ca[half][i] += qr[i][j] * cx + qi[i][j] * sx;
                        cb[half][i] += qi[i][j] * cx - qr[i][j] * sx;
                    }
                }
            }
            for (int64_t y = 0; y < H; ++y) {
                Lanes v[2];
                load_pair(src + y * src_row + x0, v[0], v[1]);  // read again: the plane is still in L1/L2
                for (int half = 0; half < 2; ++half) {
                    v[half] *= g;
                    for (int i = 0; i < NY; ++i) {
                        v[half] += cos_y[i * H + y] * ca[half][i];
                        if (!(LAST_SINE_ZERO && i == NY - 1)) v[half] += sin_y[i * H + y] * cb[half][i];
                    }
                }
                store_pair(dst + y * dst_row + x0, v[0], v[1]);
            }
        }
    }
    for (int64_t x0 = pairs_end; x0 < W; x0 += kLanes) {
        const int lanes = int(std::min<int64_t>(kLanes, W - x0));
        Lanes ca[NY] = {}, cb[NY] = {};
        for (int j = 0; j < nx; ++j) {
            const Lanes cx = load_lanes(cos_x + j * pitch + x0), sx = load_lanes(sin_x + j * pitch + x0);
            for (int i = 0; i < NY; ++i) {
                ca[i] += qr[i][j] * cx + qi[i][j] * sx;
                cb[i] += qi[i][j] * cx - qr[i][j] * sx;
            }
        }
        for (int64_t y = 0; y < H; ++y) {
            const T* in = src + y * src_row + x0;  // read again: the plane is still in L1/L2
            Lanes acc = g * (lanes == kLanes ? load_lanes(in) : load_partial(in, lanes));
            for (int i = 0; i < NY; ++i) {
                acc += cos_y[i * H + y] * ca[i];
                if (!(LAST_SINE_ZERO && i == NY - 1)) acc += sin_y[i * H + y] * cb[i];
            }
            T* out = dst + y * dst_row + x0;
            if (lanes == kLanes) {
                store_lanes(out, acc);
            } else {
                store_partial(out, acc, lanes);
            }
        }
    }
}

// Any skip plane: any strides, any band. Row sweeps over the float32 plane buffer.
template <class T> void skip_plane_rows(const Plan& p, const T* src, T* dst, Scratch& scratch) {
    const FreeuFusedConcatArgs& a = *p.a;
    const int64_t H = a.h, W = a.w;
    const int ny = p.ny;
    float* plane = scratch.plane();
    float* vc = scratch.moment_rows();
    float* vs = vc + size_t(ny) * W;
    std::fill(vc, vc + size_t(ny) * W, 0.f);
    std::fill(vs, vs + size_t(ny) * W, 0.f);
    float cy[kMaxFrequencies], sy[kMaxFrequencies];
    load_plane(src, a.skip, H, W, plane);
    for (int64_t y = 0; y < H; ++y) {
        for (int i = 0; i < ny; ++i) cy[i] = p.cos_y[size_t(i) * H + y], sy[i] = p.sin_y[size_t(i) * H + y];
        accumulate_row<0>(plane + y * W, W, cy, sy, vc, vs, ny);
    }
    float* ra = vs + size_t(ny) * W;
    float* rb = ra + size_t(ny) * W;
    coefficient_rows(p, ny, p.nx, W, vc, vs, ra, rb);
    for (int64_t y = 0; y < H; ++y) {
        for (int i = 0; i < ny; ++i) cy[i] = p.cos_y[size_t(i) * H + y], sy[i] = p.sin_y[size_t(i) * H + y];
        update_row<0>(plane + y * W, W, p.high_gain, cy, sy, ra, rb, ny);
    }
    store_plane(dst, a.out_skip, H, W, plane);
}

template <class T> void skip_plane(const Plan& p, int64_t n, int64_t c, int64_t f, Scratch& scratch) {
    const FreeuFusedConcatArgs& a = *p.a;
    const T* src = plane_at<T>(a.skip, n, c, f);
    T* dst = plane_at_mut<T>(a.out_skip, n, c, f);
    if (p.ny == 0 || p.nx == 0) {  // empty mask: every frequency has gain g_hi
        float* row = scratch.row();
        for (int64_t y = 0; y < a.h; ++y) {
            load_row(src, a.skip, y, a.w, row);
            const float g = p.high_gain;
#pragma omp simd
            for (int64_t x = 0; x < a.w; ++x) row[x] *= g;
            store_row(dst, a.out_skip, y, a.w, row);
        }
        return;
    }
    const bool rows_contiguous = (a.skip.stride[4] == 1 && a.out_skip.stride[4] == 1) || a.w == 1;
    const bool last_sine_zero = p.ny > 0 && !p.sin_y_nonzero[size_t(p.ny - 1)];
    if (rows_contiguous && p.ny == 1) {
        return last_sine_zero ? skip_plane_strips<T, 1, true>(p, src, dst)
                              : skip_plane_strips<T, 1, false>(p, src, dst);
    }
    if (rows_contiguous && p.ny == 2) {
        return last_sine_zero ? skip_plane_strips<T, 2, true>(p, src, dst)
                              : skip_plane_strips<T, 2, false>(p, src, dst);
    }
    skip_plane_rows<T>(p, src, dst, scratch);
}

// ---- channels_last: channels are the contiguous axis --------------------------------------------------
// Planes are strided by the channel count there, so the kernels run across channels instead: a work item
// is a block of channel_block() channels of one (n, f) (skip) or one row of pixels (backbone), and one
// vector holds the same pixel of kLanes channels. Used for bands of 1 or 2 frequencies per axis (threshold 1); other
// bands take the planar kernels with strided planes.

template <class T> inline Lanes load_channels(const T* p, int lanes) {
    return lanes == kLanes ? load_lanes(p) : load_partial(p, lanes);
}
template <class T> inline void store_channels(T* p, Lanes v, int lanes) {
    if (lanes == kLanes) {
        store_lanes(p, v);
    } else {
        store_partial(p, v, lanes);
    }
}

// Backbone row y of (n, f): at each pixel the window [start, stop) scaled (by b, or the pixel's v2 map
// value), the other channels copied.
template <class T> void backbone_row_channels_last(const Plan& p, int64_t n, int64_t f, int64_t y) {
    const FreeuFusedConcatArgs& a = *p.a;
    const int64_t start = a.window_start, stop = a.window_stop, cx = a.cx;
    const T* in_row = static_cast<const T*>(a.x.data) + n * a.x.stride[0] + f * a.x.stride[2] + y * a.x.stride[3];
    T* out_row = static_cast<T*>(a.out_x.data) + n * a.out_x.stride[0] + f * a.out_x.stride[2] + y * a.out_x.stride[3];
    for (int64_t x = 0; x < a.w; ++x) {
        const T* in = in_row + x * a.x.stride[4];
        T* out = out_row + x * a.out_x.stride[4];
        float scale = p.b;
        if (a.version == 2 && stop > start)
            scale = a.scale_map[n * a.map_stride[0] + f * a.map_stride[1] + y * a.map_stride[2] + x * a.map_stride[3]];
        if (start > 0) std::memcpy(out, in, sizeof(T) * size_t(start));
        if (stop > start) scale_contiguous(in + start, out + start, stop - start, scale);
        if (stop < cx) std::memcpy(out + stop, in + stop, sizeof(T) * size_t(cx - stop));
    }
}

// Skip channels [c0, c0 + kLanes) of (n, f), for bands of NY x NX frequencies (1 or 2 each). Sweep 1:
// per row, the x moments (rc, rs) over the pixels, folded into the (i, j) moments with the row's y
// twiddles; sweep 2: per row, the update's x coefficients (lc, ls) from the y twiddles, then per pixel
// g_hi h + sum_j lc_j cos_x_j + ls_j sin_x_j.
// HALVES = 2 (bfloat16, a full block of 2 kLanes channels): the block is read as kLanes words (load_pair), its even
// and odd channels in two vectors; the moments are per channel, so the lane order costs nothing.
template <class T, int HALVES> inline void load_block(const T* p, int lanes, Lanes (&v)[HALVES]) {
    if constexpr (HALVES == 2) {
        load_pair(p, v[0], v[1]);
    } else {
        v[0] = load_channels(p, lanes);
    }
}
template <class T, int HALVES> inline void store_block(T* p, int lanes, const Lanes (&v)[HALVES]) {
    if constexpr (HALVES == 2) {
        store_pair(p, v[0], v[1]);
    } else {
        store_channels(p, v[0], lanes);
    }
}

template <class T, int NY, int NX, bool LAST_SINE_ZERO, int HALVES>
void skip_block_channels_last(const Plan& p, int64_t n, int64_t f, int64_t c0, int lanes) {
    const FreeuFusedConcatArgs& a = *p.a;
    const int64_t H = a.h, W = a.w, pitch = padded(W);
    const T* src = static_cast<const T*>(a.skip.data) + n * a.skip.stride[0] + c0 * a.skip.stride[1] + f * a.skip.stride[2];
    T* dst = static_cast<T*>(a.out_skip.data) + n * a.out_skip.stride[0] + c0 * a.out_skip.stride[1] +
             f * a.out_skip.stride[2];
    const float* cos_x = p.cos_x.data();
    const float* sin_x = p.sin_x.data();
    bool sine_x[NX];
    for (int j = 0; j < NX; ++j) sine_x[j] = p.sin_x_nonzero[size_t(j)];
    Lanes moments[HALVES][NY][NX][4] = {};
    for (int64_t y = 0; y < H; ++y) {
        Lanes rc[HALVES][NX] = {}, rs[HALVES][NX] = {};
        for (int64_t x = 0; x < W; ++x) {
            Lanes v[HALVES];
            load_block<T, HALVES>(src + y * a.skip.stride[3] + x * a.skip.stride[4], lanes, v);
            for (int k = 0; k < HALVES; ++k)
                for (int j = 0; j < NX; ++j) {
                    rc[k][j] += cos_x[j * pitch + x] * v[k];
                    if (sine_x[j]) rs[k][j] += sin_x[j * pitch + x] * v[k];
                }
        }
        for (int i = 0; i < NY; ++i) {
            const float c = p.cos_y[size_t(i) * H + y], sn = p.sin_y[size_t(i) * H + y];
            for (int k = 0; k < HALVES; ++k)
                for (int j = 0; j < NX; ++j) {
                    moments[k][i][j][0] += c * rc[k][j];
                    moments[k][i][j][1] += c * rs[k][j];
                    if (!(LAST_SINE_ZERO && i == NY - 1))
                        moments[k][i][j][2] += sn * rc[k][j], moments[k][i][j][3] += sn * rs[k][j];
                }
        }
    }
    Lanes qr[HALVES][NY][NX], qi[HALVES][NY][NX];
    for (int k = 0; k < HALVES; ++k)
        for (int i = 0; i < NY; ++i)
            for (int j = 0; j < NX; ++j) {
                const float w = p.weight[size_t(i) * NX + j] * p.s_gain;
                qr[k][i][j] = w * (moments[k][i][j][0] - moments[k][i][j][3]);
                qi[k][i][j] = w * (moments[k][i][j][2] + moments[k][i][j][1]);
            }
    const float g = p.high_gain;
    for (int64_t y = 0; y < H; ++y) {
        Lanes lc[HALVES][NX] = {}, ls[HALVES][NX] = {};
        for (int i = 0; i < NY; ++i) {
            const float c = p.cos_y[size_t(i) * H + y], sn = p.sin_y[size_t(i) * H + y];
            for (int k = 0; k < HALVES; ++k)
                for (int j = 0; j < NX; ++j) {
                    lc[k][j] += c * qr[k][i][j] + sn * qi[k][i][j];
                    ls[k][j] += c * qi[k][i][j] - sn * qr[k][i][j];
                }
        }
        for (int64_t x = 0; x < W; ++x) {
            Lanes v[HALVES];
            load_block<T, HALVES>(src + y * a.skip.stride[3] + x * a.skip.stride[4], lanes, v);
            for (int k = 0; k < HALVES; ++k) {
                v[k] *= g;
                for (int j = 0; j < NX; ++j) {
                    v[k] += cos_x[j * pitch + x] * lc[k][j];
                    if (sine_x[j]) v[k] += sin_x[j * pitch + x] * ls[k][j];
                }
            }
            store_block<T, HALVES>(dst + y * a.out_skip.stride[3] + x * a.out_skip.stride[4], lanes, v);
        }
    }
}

// Channels per skip work item in the channels_last path: 2 kLanes for bfloat16 (one register of words), else
// kLanes (freeu_cpu.cpp sizes the work items with the copy's kLanes).
template <class T> constexpr int64_t channel_block() { return std::is_same_v<T, Bf16> ? 2 * kLanes : kLanes; }

template <class T, int NY, int NX, bool LAST_SINE_ZERO>
void skip_block_channels_last_sized(const Plan& p, int64_t n, int64_t f, int64_t c0) {
    const int64_t lanes = std::min<int64_t>(channel_block<T>(), p.a->ch - c0);
    if (lanes == 2 * kLanes) {
        if constexpr (std::is_same_v<T, Bf16>) return skip_block_channels_last<T, NY, NX, LAST_SINE_ZERO, 2>(p, n, f, c0, 2 * kLanes);
    }
    for (int64_t c = c0; c < c0 + lanes; c += kLanes)  // kLanes channels at a time (a narrower last one)
        skip_block_channels_last<T, NY, NX, LAST_SINE_ZERO, 1>(p, n, f, c, int(std::min<int64_t>(kLanes, c0 + lanes - c)));
}

template <class T> void skip_block_channels_last_any(const Plan& p, int64_t n, int64_t f, int64_t c0) {
    const bool last_sine_zero = !p.sin_y_nonzero[size_t(p.ny - 1)];
    const int shape = (p.ny - 1) * 2 + (p.nx - 1);  // (1,1) (1,2) (2,1) (2,2) -> 0..3
#define FREEU_CL_CASE(index, ny, nx)                                                              \
    case index:                                                                                  \
        return last_sine_zero ? skip_block_channels_last_sized<T, ny, nx, true>(p, n, f, c0)     \
                              : skip_block_channels_last_sized<T, ny, nx, false>(p, n, f, c0);
    switch (shape) {
        FREEU_CL_CASE(0, 1, 1)
        FREEU_CL_CASE(1, 1, 2)
        FREEU_CL_CASE(2, 2, 1)
        default: FREEU_CL_CASE(3, 2, 2)
    }
#undef FREEU_CL_CASE
}

template <class T> void run_items_typed(const Plan& p, std::atomic<int64_t>& next, int64_t total) {
    const FreeuFusedConcatArgs& a = *p.a;
    Scratch scratch(a);
    const int64_t backbone_per_sample = p.channels_major ? a.f * a.h : a.cx * a.f;
    const int64_t blocks = (a.ch + channel_block<T>() - 1) / channel_block<T>();
    const int64_t skip_per_sample = p.channels_major ? a.f * blocks : a.ch * a.f;
    constexpr int64_t kBlock = 8;  // items taken at once: few atomic operations, even balance
    for (;;) {
        const int64_t begin = next.fetch_add(kBlock, std::memory_order_relaxed);
        if (begin >= total) return;
        const int64_t end = std::min(total, begin + kBlock);
        for (int64_t item = begin; item < end; ++item) {
            if (item < p.backbone_items) {
                const int64_t n = item / backbone_per_sample, rest = item % backbone_per_sample;
                if (p.channels_major) {
                    backbone_row_channels_last<T>(p, n, rest / a.h, rest % a.h);
                } else {
                    backbone_plane<T>(p, n, rest / a.f, rest % a.f, scratch);
                }
            } else {
                const int64_t k = item - p.backbone_items;
                const int64_t n = k / skip_per_sample, rest = k % skip_per_sample;
                if (p.channels_major) {
                    skip_block_channels_last_any<T>(p, n, rest / blocks, rest % blocks * channel_block<T>());
                } else {
                    skip_plane<T>(p, n, rest / a.f, rest % a.f, scratch);
                }
            }
        }
    }
}

// One thread's share of a call: items taken from `next` until `total`.
inline void run_items(const Plan& p, std::atomic<int64_t>& next, int64_t total) {
    switch (p.a->dtype) {
        case FREEU_DTYPE_FLOAT32: run_items_typed<float>(p, next, total); break;
        case FREEU_DTYPE_FLOAT16: run_items_typed<_Float16>(p, next, total); break;
        default: run_items_typed<Bf16>(p, next, total); break;
    }
}

}  // namespace FREEU_CPU_NS
