//! Small real media files for the simulated provider: an animated GIF that shows the
//! prompt's text over a background coloured by the prompt, with a bar sweeping across the
//! frames, so a person opening a simulated video sees which prompt made it. The watermarked
//! rendition overlays a stripe pattern and a "REELBATCH PREVIEW" band: visibly different
//! from the clean file, as the starter plan requires.
//!
//! Everything is integer arithmetic over a fixed 16-colour palette; the same prompt always
//! gives the same bytes.

use std::borrow::Cow;

/// Frame size and count (bounded: the encoder's work is width × height × frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaSize {
    /// Pixels.
    pub width: u16,
    /// Pixels.
    pub height: u16,
    /// Frames in the animation.
    pub frames: u16,
}

impl Default for MediaSize {
    fn default() -> Self {
        MediaSize {
            width: 128,
            height: 72,
            frames: 4,
        }
    }
}

/// Largest frame edge and frame count accepted (keeps one render small and bounded).
pub const EDGE_PIXELS_MAX: u16 = 1024;
/// Most frames in one animation.
pub const FRAMES_MAX: u16 = 64;

/// The GIF content type.
pub const GIF: &str = "image/gif";

// Palette indices.
const WHITE: u8 = 0;
const BLACK: u8 = 1;
const BAR: u8 = 2;
const MARK: u8 = 3;
const BG0: u8 = 4; // 4..16: twelve background hues

const PALETTE: [u8; 48] = [
    255, 255, 255, // white
    0, 0, 0, // black
    255, 210, 60, // bar
    200, 30, 30, // watermark
    31, 58, 147, 46, 110, 160, 40, 130, 100, 70, 120, 40, // backgrounds …
    140, 110, 30, 150, 70, 30, 140, 40, 60, 120, 40, 120, //
    80, 50, 140, 50, 60, 80, 90, 90, 90, 30, 90, 90, //
];

/// 5×7 glyphs, one byte per row, bit 4 = leftmost column.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '!' => [0x04, 0x04, 0x04, 0x04, 0, 0, 0x04],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
        '\'' => [0x0C, 0x04, 0x08, 0, 0, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '&' => [0x0C, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0D],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

/// FNV-1a: a stable colour choice per prompt (not security).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: usize, y: usize, c: u8) {
        if x < self.w && y < self.h {
            self.px[y * self.w + x] = c;
        }
    }

    /// Draws `text` wrapped at the canvas width, starting at `(x0, y0)`; returns the rows used.
    fn text(&mut self, text: &str, x0: usize, y0: usize, color: u8) {
        let cols = (self.w.saturating_sub(2 * x0) / 6).max(1);
        let rows = (self.h.saturating_sub(y0) / 9).max(1);
        for (n, c) in text.chars().take(cols * rows).enumerate() {
            let (cx, cy) = (x0 + (n % cols) * 6, y0 + (n / cols) * 9);
            for (r, bits) in glyph(c).iter().enumerate() {
                for b in 0..5 {
                    if bits & (0x10 >> b) != 0 {
                        self.put(cx + b, cy + r, color);
                    }
                }
            }
        }
    }
}

/// GIF LZW without compression: clear code, then at most `LZW_RUN` literal codes, repeated.
/// The decoder's table then never grows past 5-bit codes, so every code is exactly 5 bits
/// and encoding is bit packing (≈5.4 bits per pixel). Our frames are tiny; a real
/// compressor spent most of an item's CPU time here (see BENCHMARKS.md).
///
/// ```text
/// min code size 4 | (CLEAR=16, up to 12 literals)* | EOI=17     (LSB-first, 5 bits each)
/// ```
/// After a clear the first literal adds no table entry and each later one adds one
/// (18, 19, …); 12 literals stop at entry 28, well below 32 where the width would change.
fn lzw_uncompressed(pixels: &[u8]) -> Vec<u8> {
    const MIN_CODE_SIZE: u8 = 4;
    const CLEAR: u64 = 16;
    const EOI: u64 = 17;
    const LZW_RUN: usize = 12;
    let mut out = Vec::with_capacity(2 + pixels.len() * 6 / 8 + 8);
    out.push(MIN_CODE_SIZE);
    let mut acc: u64 = 0;
    let mut bits: u32 = 0;
    let mut put = |out: &mut Vec<u8>, code: u64| {
        acc |= code << bits;
        bits += 5;
        while bits >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            bits -= 8;
        }
    };
    for chunk in pixels.chunks(LZW_RUN) {
        put(&mut out, CLEAR);
        for &p in chunk {
            debug_assert!(p < 16, "palette index {p} beyond 16 colours");
            put(&mut out, (p & 15) as u64);
        }
    }
    put(&mut out, EOI);
    if bits > 0 {
        out.push(acc as u8);
    }
    out
}

/// Renders `prompt` as an animated GIF; `watermark` gives the watermarked rendition.
///
/// Frame 0 is the whole picture; later frames replace only the band the bar moves in
/// (GIF sub-frames over the kept previous frame), so the text is drawn and encoded once.
pub fn render(prompt: &str, size: MediaSize, watermark: bool) -> Vec<u8> {
    let w = size.width.clamp(16, EDGE_PIXELS_MAX);
    let h = size.height.clamp(16, EDGE_PIXELS_MAX);
    let frames = size.frames.clamp(1, FRAMES_MAX);
    let (wu, hu) = (w as usize, h as usize);
    let bg = BG0 + (fnv(prompt) % 12) as u8;
    let mut out = Vec::with_capacity(wu * hu);
    let mut enc = gif::Encoder::new(&mut out, w, h, &PALETTE).expect("writing to a Vec");
    enc.set_repeat(gif::Repeat::Infinite)
        .expect("writing to a Vec");
    let mut canvas = Canvas {
        w: wu,
        h: hu,
        px: vec![bg; wu * hu],
    };
    canvas.text(prompt, 4, 4, WHITE);
    if watermark {
        let band = hu / 2;
        for y in band.saturating_sub(6)..(band + 6).min(hu) {
            for x in 0..wu {
                canvas.put(x, y, BLACK);
            }
        }
        canvas.text("REELBATCH PREVIEW", 4, band.saturating_sub(3), MARK);
    }
    // The bar's band: rows [bar_top, bar_bottom).
    let (bar_top, bar_bottom) = (hu - 6, hu - 2);
    let background = canvas.px.clone();
    for f in 0..frames as usize {
        // Redraw the band from the background, then the bar at this frame's position.
        let band = bar_top * wu..bar_bottom * wu;
        canvas.px[band.clone()].copy_from_slice(&background[band.clone()]);
        let bar_x = (f * wu) / frames as usize;
        for y in bar_top..bar_bottom {
            for x in bar_x..(bar_x + wu / 8).min(wu) {
                canvas.put(x, y, BAR);
            }
        }
        if watermark {
            // Diagonal stripes over everything, the bar included.
            let rows = if f == 0 { 0..hu } else { bar_top..bar_bottom };
            for y in rows {
                for x in ((8 - y % 8) % 8..wu).step_by(8) {
                    canvas.put(x, y, MARK);
                }
            }
        }
        let (top, rows) = if f == 0 {
            (0, 0..hu * wu)
        } else {
            (bar_top, band)
        };
        let frame = gif::Frame {
            width: w,
            height: ((rows.end - rows.start) / wu) as u16,
            top: top as u16,
            delay: 25,
            dispose: gif::DisposalMethod::Keep,
            buffer: Cow::Owned(lzw_uncompressed(&canvas.px[rows])),
            ..gif::Frame::default()
        };
        enc.write_lzw_pre_encoded_frame(&frame)
            .expect("writing to a Vec");
    }
    drop(enc);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_real_gif_and_watermark_differs() {
        let a = render("a cat in the rain", MediaSize::default(), false);
        assert_eq!(&a[..6], b"GIF89a");
        assert_eq!(a, render("a cat in the rain", MediaSize::default(), false));
        assert_ne!(a, render("a dog in the rain", MediaSize::default(), false));
        let wm = render("a cat in the rain", MediaSize::default(), true);
        assert_eq!(&wm[..6], b"GIF89a");
        assert_ne!(a, wm);
        // Decodes as a 4-frame animation of the stated size.
        let mut opts = gif::DecodeOptions::new();
        opts.set_color_output(gif::ColorOutput::Indexed);
        let mut d = opts.read_info(a.as_slice()).unwrap();
        assert_eq!((d.width(), d.height()), (128, 72));
        let mut n = 0;
        while d.read_next_frame().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 4);
    }

    #[test]
    fn uncompressed_lzw_decodes_to_the_same_pixels() {
        // Every length around the clear-code period, every palette index.
        for len in [1usize, 11, 12, 13, 24, 25, 1000, 9216] {
            let px: Vec<u8> = (0..len).map(|i| ((i * 7 + i / 13) % 16) as u8).collect();
            let mut gif_bytes = Vec::new();
            {
                let mut enc = gif::Encoder::new(&mut gif_bytes, len as u16, 1, &PALETTE).unwrap();
                let frame = gif::Frame {
                    width: len as u16,
                    height: 1,
                    buffer: Cow::Owned(lzw_uncompressed(&px)),
                    ..gif::Frame::default()
                };
                enc.write_lzw_pre_encoded_frame(&frame).unwrap();
            }
            let mut opts = gif::DecodeOptions::new();
            opts.set_color_output(gif::ColorOutput::Indexed);
            let mut d = opts.read_info(gif_bytes.as_slice()).unwrap();
            let f = d.read_next_frame().unwrap().unwrap();
            assert_eq!(&f.buffer[..], &px[..], "len {len}");
        }
    }
}
