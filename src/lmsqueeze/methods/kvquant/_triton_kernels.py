"""The Triton source of the KVQuant decode kernels (imported lazily by kernels.py, which documents them)."""

import triton
import triton.language as tl


@triton.jit
def _outlier(ow, HI: tl.constexpr, IMASK: tl.constexpr):
    """Entry HI (0: low half, 1: high half) of packed outlier words (pack.pack_outliers) -> (channel int32,
    value float32): the channel in the low bits (IMASK), the shortened fp16 value in the rest."""
    e = (ow >> (16 * HI)) & 0xFFFF
    ov = (e & (0xFFFF ^ IMASK)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return e & IMASK, ov


@triton.jit
def _fold(lv, chan, oi, x, USE_ASM: tl.constexpr):
    """lv + x at channel oi of each row: sparse outliers folded into a tile of levels.

    lv: [BN, C] fp16; chan: [C] fp16 channel numbers of lv's columns; oi, x: [BN] fp16 (oi: exact integers; a
    channel outside chan adds nothing). With inline assembly two elements take one `set.eq.f16x2` (1.0 where
    equal) and one `fma.rn.f16x2`, instead of an integer compare, a select and an add each."""
    if USE_ASM:
        c = tl.broadcast_to(chan[None, :], lv.shape)
        o = tl.broadcast_to(oi[:, None], lv.shape)
        v = tl.broadcast_to(x[:, None], lv.shape)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 m; set.eq.f16x2.f16x2 m, $1, $2; fma.rn.f16x2 $0, m, $3, $4; }",
            "=r,r,r,r,r", [c, o, v, lv], dtype=tl.float16, is_pure=True, pack=2)
    else:
        return lv + tl.where(chan[None, :] == oi[:, None], x[:, None], 0.0).to(tl.float16)


@triton.jit
def _asm_levels(sel, t0, t1):
    # sel: low 16 bits = 4 nibble codes (< 8); t0, t1: the codebook's bytes (level + 128) -> level / 128
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, lo, hi, m, k, c;
        mov.b32 m, 0x64646464;
        mov.b32 k, 0x20002000;
        mov.b32 c, 0xC880C880;
        prmt.b32 t, $5, $6, $4;
        prmt.b32 lo, t, m, 0x5140;
        prmt.b32 hi, t, m, 0x7362;
        fma.rn.f16x2 lo, lo, k, c;
        fma.rn.f16x2 hi, hi, k, c;
        mov.b32 {$0, $1}, lo;
        mov.b32 {$2, $3}, hi;
        }""",
        constraints="=h,=h,=h,=h,r,r,r",
        args=[sel, t0, t1],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _asm_levels16(sel7, selx, t0, t1, t2, t3):
    # 4-bit: sel7 = nibbles & 7, selx = per-byte choice between entries 0..7 and 8..15
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 a, b, t, lo, hi, m, k, c;
        mov.b32 m, 0x64646464;
        mov.b32 k, 0x20002000;
        mov.b32 c, 0xC880C880;
        prmt.b32 a, $6, $7, $4;
        prmt.b32 b, $8, $9, $4;
        prmt.b32 t, a, b, $5;
        prmt.b32 lo, t, m, 0x5140;
        prmt.b32 hi, t, m, 0x7362;
        fma.rn.f16x2 lo, lo, k, c;
        fma.rn.f16x2 hi, hi, k, c;
        mov.b32 {$0, $1}, lo;
        mov.b32 {$2, $3}, hi;
        }""",
        constraints="=h,=h,=h,=h,r,r,r,r,r,r",
        args=[sel7, selx, t0, t1, t2, t3],
        dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=1)


@triton.jit
def _opaque(x, USE_ASM: tl.constexpr):
    """Identity on an fp16 tensor that Triton cannot look through (side-effecting asm). Placed on MMA operands
    so the compiler's operand-width heuristic does not see the joins / int8 loads behind them (it would pick
    kWidth = 4 and load the operands with plain 64-bit shared loads instead of ldmatrix)."""
    if USE_ASM:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=False, pack=2)
    else:
        return x


@triton.jit
def _table_levels(sel, LUT):
    # reference path: nibble codes -> LUT[code] (fp32 level / 128) as fp16
    a = tl.load(LUT + (sel & 15)).to(tl.float16)
    b = tl.load(LUT + ((sel >> 4) & 15)).to(tl.float16)
    c = tl.load(LUT + ((sel >> 8) & 15)).to(tl.float16)
    d = tl.load(LUT + ((sel >> 12) & 15)).to(tl.float16)
    return a, b, c, d


@triton.jit
def _levels4(sel, t0, t1, LUT, USE_ASM: tl.constexpr):
    if USE_ASM:
        a, b, c, d = _asm_levels(sel, sel * 0 + t0, sel * 0 + t1)
    else:
        a, b, c, d = _table_levels(sel, LUT)
    return a, b, c, d


@triton.jit
def _nat4(p0, p1, p2, p3):
    return tl.interleave(tl.interleave(p0, p2), tl.interleave(p1, p3))


@triton.jit
def _nat8(p0, p1, p2, p3, p4, p5, p6, p7):
    return tl.interleave(_nat4(p0, p2, p4, p6), _nat4(p1, p3, p5, p7))


@triton.jit
def _nat16(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15):
    return tl.interleave(_nat8(p0, p2, p4, p6, p8, p10, p12, p14), _nat8(p1, p3, p5, p7, p9, p11, p13, p15))


@triton.jit
def _unpack(WP, row, col0, t0, t1, t2, t3, LUT, NW: tl.constexpr, WB: tl.constexpr, BITS: tl.constexpr,
            USE_ASM: tl.constexpr):
    """Levels / 128 (fp16) of the channels whose words start at `col0`.

    WP: the (batch, head) base pointer; row: [BN] int32 word offsets of token rows; NW: words (3 bits: low
    words) per row read; WB: first high-bit word of a row (3 bits). Returns [BN, 16 * NW] (8 * NW for 4 bits).
    """
    w = tl.arange(0, NW)
    wd = tl.load(WP + row[:, None] + col0 + w[None, :])
    if BITS == 4:
        if USE_ASM:
            s7 = wd & 0x77777777
            sx = ((wd >> 1) & 0x44444444) | 0x32103210
            z = wd * 0
            p0, p1, p2, p3 = _asm_levels16(s7, sx, z + t0, z + t1, z + t2, z + t3)
            p4, p5, p6, p7 = _asm_levels16(s7 >> 16, sx >> 16, z + t0, z + t1, z + t2, z + t3)
        else:
            p0, p1, p2, p3 = _table_levels(wd, LUT)
            p4, p5, p6, p7 = _table_levels(wd >> 16, LUT)
        out = _nat8(p0, p1, p2, p3, p4, p5, p6, p7)
    else:
        lo = wd & 0x33333333
        hi = (wd >> 2) & 0x33333333
        if BITS == 3:
            # the NW // 2 high-bit words of these low words, loaded contiguously (a vectorised load) and
            # each repeated for its two low words with a register-only join; a gathered (w // 2) load here
            # left the unpacked levels in a layout whose shared-memory staging for the MMA took 16-bit stores
            hw = tl.load(WP + row[:, None] + WB + col0 // 2 + tl.arange(0, NW // 2)[None, :])
            hb = tl.reshape(tl.join(hw, hw), (row.shape[0], NW)) >> (2 * (w % 2))[None, :]
            lo = lo | ((hb & 0x11111111) << 2)
            hi = hi | (((hb >> 1) & 0x11111111) << 2)
        p0, p1, p2, p3 = _levels4(lo, t0, t1, LUT, USE_ASM)
        p4, p5, p6, p7 = _levels4(lo >> 16, t0, t1, LUT, USE_ASM)
        p8, p9, p10, p11 = _levels4(hi, t0, t1, LUT, USE_ASM)
        p12, p13, p14, p15 = _levels4(hi >> 16, t0, t1, LUT, USE_ASM)
        out = _nat16(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13, p14, p15)
    return out


@triton.jit
def _cat(a, b, R: tl.constexpr, C: tl.constexpr):
    """[a | b] along the last dim (a, b: [R, C]) -> [R, 2C], via join + permute (kept in registers)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (R, 2 * C))


@triton.jit
def _plane(TAB, s: tl.constexpr, row, NW: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr):
    # one plane of a host table laid out like the packed words ([plane, BLOCK_N, W] fp32 bits), so the load
    # gets the same register layout as the words (and, after the interleaves, as the levels)
    w = tl.arange(0, NW)
    return tl.load(TAB + s * BLOCK_N * W + row[:, None] + w[None, :]).to(tl.float32, bitcast=True).to(tl.float16)


@triton.jit
def _rope_tables(TAB, row, NW: tl.constexpr, BITS: tl.constexpr, BLOCK_N: tl.constexpr, W: tl.constexpr):
    """cos and sin (fp16) of n * inv_freq[f] for n < BLOCK_N over the channels f of one half, in the levels'
    register layout. TAB: [2 (cos, sin), planes, BLOCK_N, W] (see kernels.rope_planes)."""
    if BITS == 4:
        cr = _nat8(_plane(TAB, 0, row, NW, BLOCK_N, W), _plane(TAB, 1, row, NW, BLOCK_N, W),
                   _plane(TAB, 2, row, NW, BLOCK_N, W), _plane(TAB, 3, row, NW, BLOCK_N, W),
                   _plane(TAB, 4, row, NW, BLOCK_N, W), _plane(TAB, 5, row, NW, BLOCK_N, W),
                   _plane(TAB, 6, row, NW, BLOCK_N, W), _plane(TAB, 7, row, NW, BLOCK_N, W))
        sr = _nat8(_plane(TAB, 8, row, NW, BLOCK_N, W), _plane(TAB, 9, row, NW, BLOCK_N, W),
                   _plane(TAB, 10, row, NW, BLOCK_N, W), _plane(TAB, 11, row, NW, BLOCK_N, W),
                   _plane(TAB, 12, row, NW, BLOCK_N, W), _plane(TAB, 13, row, NW, BLOCK_N, W),
                   _plane(TAB, 14, row, NW, BLOCK_N, W), _plane(TAB, 15, row, NW, BLOCK_N, W))
    else:
        cr = _nat16(_plane(TAB, 0, row, NW, BLOCK_N, W), _plane(TAB, 1, row, NW, BLOCK_N, W),
                    _plane(TAB, 2, row, NW, BLOCK_N, W), _plane(TAB, 3, row, NW, BLOCK_N, W),
                    _plane(TAB, 4, row, NW, BLOCK_N, W), _plane(TAB, 5, row, NW, BLOCK_N, W),
                    _plane(TAB, 6, row, NW, BLOCK_N, W), _plane(TAB, 7, row, NW, BLOCK_N, W),
                    _plane(TAB, 8, row, NW, BLOCK_N, W), _plane(TAB, 9, row, NW, BLOCK_N, W),
                    _plane(TAB, 10, row, NW, BLOCK_N, W), _plane(TAB, 11, row, NW, BLOCK_N, W),
                    _plane(TAB, 12, row, NW, BLOCK_N, W), _plane(TAB, 13, row, NW, BLOCK_N, W),
                    _plane(TAB, 14, row, NW, BLOCK_N, W), _plane(TAB, 15, row, NW, BLOCK_N, W))
        sr = _nat16(_plane(TAB, 16, row, NW, BLOCK_N, W), _plane(TAB, 17, row, NW, BLOCK_N, W),
                    _plane(TAB, 18, row, NW, BLOCK_N, W), _plane(TAB, 19, row, NW, BLOCK_N, W),
                    _plane(TAB, 20, row, NW, BLOCK_N, W), _plane(TAB, 21, row, NW, BLOCK_N, W),
                    _plane(TAB, 22, row, NW, BLOCK_N, W), _plane(TAB, 23, row, NW, BLOCK_N, W),
                    _plane(TAB, 24, row, NW, BLOCK_N, W), _plane(TAB, 25, row, NW, BLOCK_N, W),
                    _plane(TAB, 26, row, NW, BLOCK_N, W), _plane(TAB, 27, row, NW, BLOCK_N, W),
                    _plane(TAB, 28, row, NW, BLOCK_N, W), _plane(TAB, 29, row, NW, BLOCK_N, W),
                    _plane(TAB, 30, row, NW, BLOCK_N, W), _plane(TAB, 31, row, NW, BLOCK_N, W))
    return cr, sr


@triton.jit
def _sincos_reduced(x, USE_ASM: tl.constexpr):
    """cos(x), sin(x) of fp32 angles of any size: reduced modulo 2*pi in float64, then cos/sin.approx (MUFU,
    absolute error ~1e-6 on [-pi, pi]) with inline assembly, libm otherwise."""
    xd = x.to(tl.float64)
    r = (xd - tl.floor(xd * 0.15915494309189535 + 0.5) * 6.283185307179586).to(tl.float32)
    if USE_ASM:
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        return c, s
    else:
        return tl.cos(r), tl.sin(r)


@triton.jit
def _key_outlier(ow, HI: tl.constexpr, IMASK: tl.constexpr, HALF: tl.constexpr, pos, INV_FREQ, scale,
                 USE_ASM: tl.constexpr):
    """Entry HI of the key outlier words ow of tokens at positions pos ([BN] fp32) -> (channel, its RoPE partner
    channel, cos, signed sin, value * scale): each query's score gains (q[channel] * cos + q[partner] * sin) *
    value * scale (q . R(pos) (value e_channel), keys pre-RoPE)."""
    oi, ov = _outlier(ow, HI, IMASK)
    upper = oi >= HALF
    of = tl.where(upper, oi - HALF, oi)
    oc, os = _sincos_reduced(pos * tl.load(INV_FREQ + of), USE_ASM)
    return oi, tl.where(upper, of, oi + HALF), oc, tl.where(upper, -os, os), ov * scale


@triton.jit
def _split_kernel(
    Q, O_part, L_part,
    KC, VC, KO, VO, VS, VZ, POS, KIND, SK, SV, SSLOT,
    KS16, KZ16, EYE, KLUT, VLUT, INV_FREQ, ROPE_TAB, LENGTHS, STARTS, VSMAX, TSC,
    qk_scale, rope_scale, cap, Hkv, n_sink, fwin, mwin, num_splits,
    kt0, kt1, kt2, kt3, vt0, vt1, vt2, vt3,
    D: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr, NOUT: tl.constexpr, IMASK: tl.constexpr, NSIDE: tl.constexpr, NSIDE_P2: tl.constexpr,
    HAS_STARTS: tl.constexpr, USE_ASM: tl.constexpr, QROWS: tl.constexpr,
    KROT: tl.constexpr = False, VFOLD: tl.constexpr = False, HAS_TSCALE: tl.constexpr = False,
):
    HALF: tl.constexpr = D // 2
    if BITS == 4:
        NWH: tl.constexpr = D // 16     # words per half row
    else:
        NWH: tl.constexpr = D // 32     # (3 bits: low words)
    WB: tl.constexpr = D // 16          # 3 bits: first high-bit word of a row
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    L = tl.load(LENGTHS + b)
    lo = L * 0
    if HAS_STARTS:
        lo = tl.load(STARTS + b)
    if mwin > 0:
        lo = tl.maximum(lo, L - mwin)
    qhi = L - fwin
    lo_al = (lo // BLOCK_N) * BLOCK_N
    per = tl.cdiv(tl.cdiv(tl.maximum(qhi - lo_al, 0), num_splits), BLOCK_N) * BLOCK_N
    s_lo = lo_al + pid_s * per
    s_hi = tl.minimum(s_lo + per, qhi)

    # per-(batch, head) base pointers; offsets inside the loop are int32
    tok0 = bh.to(tl.int64) * cap
    KCb = KC + tok0 * W
    VCb = VC + tok0 * W
    KOb = KO + tok0 * NOUT
    VOb = VO + tok0 * NOUT
    VSb = VS + tok0
    VZb = VZ + tok0
    TSCb = TSC + tok0
    KINDb = KIND + b.to(tl.int64) * cap
    POSb = POS + b.to(tl.int64) * cap

    g = tl.arange(0, BLOCK_G)
    f = tl.arange(0, HALF)
    d = tl.arange(0, D)
    nn = tl.arange(0, BLOCK_N)
    gmask = g < G
    qrow = bh * G + g
    Qb = Q + qrow[:, None] * D
    Qb_t = Q + qrow[None, :] * D
    q1 = tl.load(Qb + f[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * (qk_scale * rope_scale)
    q2 = tl.load(Qb + HALF + f[None, :], mask=gmask[:, None], other=0.0).to(tl.float32) * (qk_scale * rope_scale)
    s16a = tl.load(KS16 + h * D + f).to(tl.float32)
    s16b = tl.load(KS16 + h * D + HALF + f).to(tl.float32)
    s1 = s16a * 128.0
    s2 = s16b * 128.0
    z1 = tl.load(KZ16 + h * D + f).to(tl.float32) + 1152.0 * s16a
    z2 = tl.load(KZ16 + h * D + HALF + f).to(tl.float32) + 1152.0 * s16b
    inv = tl.load(INV_FREQ + f)
    # fixed fp16 normalisation of the query-side operands: rotations keep each (q1_f, q2_f) pair's norm
    qn = tl.sqrt(q1 * q1 + q2 * q2)
    ynorm = tl.maximum(tl.max(qn * tl.maximum(s1, s2)[None, :], 1), 1e-30)
    znorm = tl.maximum(tl.max(qn * tl.sqrt(z1 * z1 + z2 * z2)[None, :], 1), 1e-30)
    A1 = s1[None, :] / ynorm[:, None]
    A2 = s2[None, :] / ynorm[:, None]
    Z1 = z1[None, :] / znorm[:, None]
    Z2 = z2[None, :] / znorm[:, None]
    # the query rotated back to the split's first position; each tile then steps by BLOCK_N positions
    p_first = tl.load(POSb + tl.minimum(s_lo, cap - 1)).to(tl.float32)
    c0, sn0 = _sincos_reduced(p_first * inv, False)
    qt1 = q1 * c0[None, :] + q2 * sn0[None, :]
    qt2 = q2 * c0[None, :] - q1 * sn0[None, :]
    cB = tl.cos(inv * BLOCK_N)
    sB = tl.sin(inv * BLOCK_N)
    # relative RoPE tables of the tile's offsets, in the levels' layout
    CR, SR = _rope_tables(ROPE_TAB, nn * W, NWH, BITS, BLOCK_N, W)
    T = _opaque(_cat(CR, SR, BLOCK_N, HALF), USE_ASM)
    if KROT:
        CRf = CR.to(tl.float32)
        SRf = SR.to(tl.float32)
        zk1 = z1   # key = (level / 128) * s1 + zeff, and z1 = z16 + 1152 * s16 = zeff
        zk2 = z2

    # scores are computed transposed, [BLOCK_N, BLOCK_G], so the big operands (keys, values) are the MMA's
    # M side and the G query heads its (padded) N side
    if QROWS:  # scores [BLOCK_G, BLOCK_N]: queries on the MMA's M side, as in flash attention
        m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
        la = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)   # sum of p, reduced after the loop
        za = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)   # sum of p * value zero, reduced after the loop
        acc = tl.zeros((BLOCK_G, D), tl.float32)
        vmax = tl.maximum(tl.load(VSMAX + bh) * 128.0, 1e-30)
        for n0 in range(s_lo, s_hi, BLOCK_N):
            slots = n0 + nn
            row = slots * W
            Y = _cat(_cat(A1 * qt1, A1 * qt2, BLOCK_G, HALF), _cat(A2 * qt2, -(A2 * qt1), BLOCK_G, HALF),
                     BLOCK_G, D).to(tl.float16)
            Y = _opaque(Y, USE_ASM)
            Yz = _opaque(_cat(Z1 * qt1 + Z2 * qt2, Z1 * qt2 - Z2 * qt1, BLOCK_G, HALF).to(tl.float16), USE_ASM)
            # keys: levels of each half times the relative RoPE tables; scales and zeros sit in Y / Yz
            l1 = _unpack(KCb, row, 0, kt0, kt1, kt2, kt3, KLUT, NWH, WB, BITS, USE_ASM)
            l2 = _unpack(KCb, row, NWH, kt0, kt1, kt2, kt3, KLUT, NWH, WB, BITS, USE_ASM)
            X = _cat(_cat(l1 * CR, l1 * SR, BLOCK_N, HALF), _cat(l2 * CR, l2 * SR, BLOCK_N, HALF), BLOCK_N, D)
            X = _opaque(X, USE_ASM)
            if HAS_TSCALE:  # per-token key scales r: the levels' part of each token's score times r
                ts = tl.exp2(tl.load(TSCb + slots).to(tl.float32) * (1.0 / 16.0) - 8.0)
                qk = (tl.dot(Y, tl.trans(X)) * (ynorm[:, None] * ts[None, :])
                      + tl.dot(Yz, tl.trans(T)) * znorm[:, None])
            else:
                qk = tl.dot(Y, tl.trans(X)) * ynorm[:, None] + tl.dot(Yz, tl.trans(T)) * znorm[:, None]
            # sparse key outliers: q . (a R(p) x e_c) added to the scores of their tokens
            for w in tl.static_range(NOUT):
                ow = tl.load(KOb + slots * NOUT + w)  # one load, two entries
                for hi in tl.static_range(2):
                    oi, op, oc, sgn, ovs = _key_outlier(ow, hi, IMASK, HALF, p_first + (slots - s_lo).to(tl.float32),
                                                        INV_FREQ, qk_scale * rope_scale, USE_ASM)
                    qa = tl.load(Qb + oi[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
                    qb = tl.load(Qb + op[None, :], mask=gmask[:, None], other=0.0)
                    qk += (qa * oc[None, :] + qb.to(tl.float32) * sgn[None, :]) * ovs[None, :]
            kind = tl.load(KINDb + slots)
            ok = (slots >= lo) & (slots < s_hi) & (kind == 1)
            qk = tl.where(ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            la = la * alpha[:, None] + p

            # values: levels on tensor cores with the per-token scale on p; zeros as p . z; outliers via identity rows
            vs = tl.load(VSb + slots).to(tl.float32) * 128.0
            vz = tl.load(VZb + slots).to(tl.float32)
            lv = _opaque(_unpack(VCb, row, 0, vt0, vt1, vt2, vt3, VLUT, 2 * NWH, WB, BITS, USE_ASM), USE_ASM)
            pv = (p * (vs / vmax)[None, :]).to(tl.float16)
            za = za * alpha[:, None] + p * vz[None, :]
            upd = tl.dot(pv, lv) * vmax
            for w in tl.static_range(NOUT):
                ow = tl.load(VOb + slots * NOUT + w)  # one load, two entries
                for hi in tl.static_range(2):
                    oi, ov = _outlier(ow, hi, IMASK)
                    ev = tl.load(EYE + oi[:, None] * D + d[None, :])
                    upd += tl.dot((p * ov[None, :]).to(tl.float16), ev)
            acc = acc * alpha[:, None] + upd
            m_i = m_new
            qn1 = qt1 * cB[None, :] + qt2 * sB[None, :]
            qt2 = qt2 * cB[None, :] - qt1 * sB[None, :]
            qt1 = qn1
        l_i = tl.sum(la, 1)
        acc += tl.sum(za, 1)[:, None]
        acc = tl.trans(acc)
    else:  # scores [BLOCK_N, BLOCK_G]: keys / values on the MMA's M side
        m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)
        la = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)   # sum of p, reduced after the loop
        za = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)   # sum of p * value zero, reduced after the loop
        acc = tl.zeros((D, BLOCK_G), tl.float32)
        vmax = tl.maximum(tl.load(VSMAX + bh) * 128.0, 1e-30)
        chv = tl.arange(0, D).to(tl.float16)   # channel numbers (value-outlier fold)
        for n0 in range(s_lo, s_hi, BLOCK_N):
            slots = n0 + nn
            row = slots * W
            l1 = _unpack(KCb, row, 0, kt0, kt1, kt2, kt3, KLUT, NWH, WB, BITS, USE_ASM)
            l2 = _unpack(KCb, row, NWH, kt0, kt1, kt2, kt3, KLUT, NWH, WB, BITS, USE_ASM)
            ts = tl.full((BLOCK_N,), 1.0, tl.float32)
            if HAS_TSCALE:  # per-token key scales r (one byte each): key = level * r * s + z
                ts = tl.exp2(tl.load(TSCb + slots).to(tl.float32) * (1.0 / 16.0) - 8.0)
            if KROT:
                # keys dequantized (per-channel scale and zero) and rotated by the tile's relative offsets in
                # registers: one [BLOCK_N, D] operand against the query rotated to the tile's first position
                k1 = l1.to(tl.float32) * (s1[None, :] * ts[:, None]) + zk1[None, :]
                k2 = l2.to(tl.float32) * (s2[None, :] * ts[:, None]) + zk2[None, :]
                X = _cat(k1 * CRf - k2 * SRf, k2 * CRf + k1 * SRf, BLOCK_N, HALF).to(tl.float16)
                X = _opaque(X, USE_ASM)
                Yq = _opaque(_cat(qt1, qt2, BLOCK_G, HALF).to(tl.float16), USE_ASM)
                qk = tl.dot(X, tl.trans(Yq))
            else:
                Y = _cat(_cat(A1 * qt1, A1 * qt2, BLOCK_G, HALF), _cat(A2 * qt2, -(A2 * qt1), BLOCK_G, HALF),
                         BLOCK_G, D).to(tl.float16)
                Y = _opaque(Y, USE_ASM)
                Yz = _opaque(_cat(Z1 * qt1 + Z2 * qt2, Z1 * qt2 - Z2 * qt1, BLOCK_G, HALF).to(tl.float16),
                             USE_ASM)
                # keys: levels of each half times the relative RoPE tables; scales and zeros sit in Y / Yz
                X = _cat(_cat(l1 * CR, l1 * SR, BLOCK_N, HALF), _cat(l2 * CR, l2 * SR, BLOCK_N, HALF), BLOCK_N, D)
                X = _opaque(X, USE_ASM)
                qk = (tl.dot(X, tl.trans(Y)) * (ynorm[None, :] * ts[:, None])
                      + tl.dot(T, tl.trans(Yz)) * znorm[None, :])
            # sparse key outliers: q . (a R(p) x e_c) added to the scores of their tokens
            for w in tl.static_range(NOUT):
                ow = tl.load(KOb + slots * NOUT + w)  # one load, two entries
                for hi in tl.static_range(2):
                    oi, op, oc, sgn, ovs = _key_outlier(ow, hi, IMASK, HALF, p_first + (slots - s_lo).to(tl.float32),
                                                        INV_FREQ, qk_scale * rope_scale, USE_ASM)
                    qa = tl.load(Qb_t + oi[:, None], mask=gmask[None, :], other=0.0).to(tl.float32)
                    qb = tl.load(Qb_t + op[:, None], mask=gmask[None, :], other=0.0)
                    qk += (qa * oc[:, None] + qb.to(tl.float32) * sgn[:, None]) * ovs[:, None]
            kind = tl.load(KINDb + slots)
            ok = (slots >= lo) & (slots < s_hi) & (kind == 1)
            qk = tl.where(ok[:, None], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[None, :])
            la = la * alpha[None, :] + p

            # values: levels on tensor cores with the per-token scale on p; zeros as p . z; outliers via identity rows
            vs = tl.load(VSb + slots).to(tl.float32) * 128.0
            vz = tl.load(VZb + slots).to(tl.float32)
            lv = _unpack(VCb, row, 0, vt0, vt1, vt2, vt3, VLUT, 2 * NWH, WB, BITS, USE_ASM)
            if VFOLD:  # sparse value outliers folded into the levels (residual / scale at their channel)
                vsafe = tl.where(vs > 0, vs, 1.0)
                for w in tl.static_range(NOUT):  # in fp16: no conversion per element
                    ow = tl.load(VOb + slots * NOUT + w)  # one load, two entries
                    for hi in tl.static_range(2):
                        oi, ov = _outlier(ow, hi, IMASK)
                        lv = _fold(lv, chv, oi.to(tl.float16), (ov / vsafe).to(tl.float16), USE_ASM)
            lv = _opaque(lv, USE_ASM)
            pv = _opaque((p * (vs / vmax)[:, None]).to(tl.float16), USE_ASM)
            za = za * alpha[None, :] + p * vz[:, None]
            upd = tl.dot(tl.trans(lv), pv) * vmax
            if not VFOLD:  # sparse value outliers through identity rows
                for w in tl.static_range(NOUT):
                    ow = tl.load(VOb + slots * NOUT + w)  # one load, two entries
                    for hi in tl.static_range(2):
                        oi, ov = _outlier(ow, hi, IMASK)
                        ev = tl.load(EYE + oi[:, None] * D + d[None, :])
                        upd += tl.dot(tl.trans(ev), _opaque((p * ov[:, None]).to(tl.float16), USE_ASM))
            acc = acc * alpha[None, :] + upd
            m_i = m_new
            qn1 = qt1 * cB[None, :] + qt2 * sB[None, :]
            qt2 = qt2 * cB[None, :] - qt1 * sB[None, :]
            qt1 = qn1
        l_i = tl.sum(la, 0)
        acc += tl.sum(za, 0)[None, :]
    if NSIDE > 0:  # noqa: SIM102 - a constexpr test around a runtime one
        if pid_s == 0:
            e = tl.arange(0, NSIDE_P2)
            em = e < NSIDE
            sl = tl.load(SSLOT + b * NSIDE + e, mask=em, other=-1)
            sok = (sl >= 0) & (sl >= lo) & (sl < L) & ((e < n_sink) | (sl >= L - fwin))
            srow = bh * NSIDE + e
            ks = tl.load(SK + srow[:, None] * D + d[None, :], mask=em[:, None], other=0.0).to(tl.float16)
            vv = tl.load(SV + srow[:, None] * D + d[None, :], mask=em[:, None], other=0.0).to(tl.float16)
            qf = tl.load(Qb + d[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
            qf = (qf * qk_scale).to(tl.float16)
            sq = tl.dot(ks, tl.trans(qf))
            sq = tl.where(sok[:, None], sq, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sq, 0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(sq - m_new[None, :])
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha[None, :] + tl.dot(tl.trans(vv), _opaque(p.to(tl.float16), USE_ASM))
            m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[None, :]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    prow = qrow * num_splits + pid_s
    tl.store(O_part + prow[None, :] * D + d[:, None], out, mask=gmask[None, :])
    tl.store(L_part + prow, lse, mask=gmask)


@triton.jit
def _merge_kernel(O_part, L_part, Out, Lse, num_splits, D: tl.constexpr, SPLITS_P2: tl.constexpr):
    r = tl.program_id(0)
    s = tl.arange(0, SPLITS_P2)
    d = tl.arange(0, D)
    sm = s < num_splits
    lse = tl.load(L_part + r * num_splits + s, mask=sm, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(lse - mx)
    tot = tl.sum(w, 0)
    o = tl.load(O_part + (r * num_splits + s)[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(Out + r * D + d, out.to(Out.dtype.element_ty))
    tl.store(Lse + r, tl.where(tot > 0, (mx + tl.log2(tl.where(tot > 0, tot, 1.0))) / 1.4426950408889634,
                               float("-inf")))
