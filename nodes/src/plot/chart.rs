//! A small raster line chart: learning curves (accuracy against training steps)
//! drawn straight into an RGB image, with an 8×8 bitmap font for the labels, so a
//! report needs no font files and no system libraries.

use image::{Rgb, RgbImage};

/// One line of the chart.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// The y range is fixed (rates live in 0..1); x starts at 0 and ends at the
    /// largest x of any series, rounded up to a tick.
    pub y_range: (f64, f64),
    /// A dashed horizontal line, e.g. the goal a curve must reach.
    pub target: Option<(f64, String)>,
    pub series: Vec<Series>,
}

const WIDTH: u32 = 720;
const HEIGHT: u32 = 420;
const LEFT: i64 = 64;
const RIGHT: i64 = 190;
const TOP: i64 = 36;
const BOTTOM: i64 = 48;
const GLYPH: i64 = 8;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const TARGET: Rgb<u8> = Rgb([150, 150, 150]);
/// Distinct on white and for the common colour-vision deficiencies (Okabe–Ito).
const PALETTE: [Rgb<u8>; 6] = [
    Rgb([0, 114, 178]),
    Rgb([213, 94, 0]),
    Rgb([0, 158, 115]),
    Rgb([204, 121, 167]),
    Rgb([230, 159, 0]),
    Rgb([86, 180, 233]),
];

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks.
pub fn tick_step(span: f64, ticks: usize) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / ticks.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let unit = raw / magnitude;
    let nice = if unit <= 1.0 {
        1.0
    } else if unit <= 2.0 {
        2.0
    } else if unit <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn tick_label(value: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{}", value.round() as i64)
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{value:.decimals$}")
    }
}

struct Canvas {
    img: RgbImage,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: Rgb<u8>) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }

    /// A line `thickness` pixels wide (Bresenham with a square pen); with `dash`,
    /// pixels are drawn in runs of `dash` and skipped in runs of `dash`.
    fn line(
        &mut self,
        from: (i64, i64),
        to: (i64, i64),
        thickness: i64,
        c: Rgb<u8>,
        dash: Option<i64>,
    ) {
        let (mut x, mut y) = from;
        let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
        let (sx, sy) = (if x < to.0 { 1 } else { -1 }, if y < to.1 { 1 } else { -1 });
        let mut err = dx + dy;
        let half = thickness / 2;
        let mut n = 0i64;
        loop {
            if dash.is_none_or(|d| (n / d) % 2 == 0) {
                self.rect(x - half, y - half, thickness, thickness, c);
            }
            n += 1;
            if (x, y) == to {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb<u8>) {
        for (i, ch) in s.chars().enumerate() {
            let code = ch as usize;
            let glyph = if code < 128 {
                font8x8::legacy::BASIC_LEGACY[code]
            } else {
                font8x8::legacy::BASIC_LEGACY[b'?' as usize]
            };
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + i as i64 * GLYPH + col, y + row as i64, c);
                    }
                }
            }
        }
    }

    fn text_width(s: &str) -> i64 {
        s.chars().count() as i64 * GLYPH
    }

    /// Text turned a quarter left (reading bottom to top), its centre at (x, y).
    fn text_vertical(&mut self, x: i64, y: i64, s: &str, c: Rgb<u8>) {
        let top = y + Self::text_width(s) / 2;
        for (i, ch) in s.chars().enumerate() {
            let code = (ch as usize).min(127);
            let glyph = font8x8::legacy::BASIC_LEGACY[code];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + row as i64, top - i as i64 * GLYPH - col, c);
                    }
                }
            }
        }
    }
}

impl Chart {
    pub fn render(&self) -> RgbImage {
        let mut cv = Canvas {
            img: RgbImage::from_pixel(WIDTH, HEIGHT, BACKGROUND),
        };
        let (x0, x1) = (LEFT, WIDTH as i64 - RIGHT);
        let (y0, y1) = (TOP, HEIGHT as i64 - BOTTOM);
        let x_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|x| x.is_finite())
            .fold(0.0f64, f64::max);
        let x_step = tick_step(x_max, 6);
        let x_end = ((x_max / x_step).ceil() * x_step).max(x_step);
        let (y_lo, y_hi) = self.y_range;
        let y_step = tick_step(y_hi - y_lo, 5);
        let px = |x: f64| x0 + ((x / x_end) * (x1 - x0) as f64).round() as i64;
        let py = |y: f64| {
            let t = ((y - y_lo) / (y_hi - y_lo)).clamp(0.0, 1.0);
            y1 - (t * (y1 - y0) as f64).round() as i64
        };

        // Grid and tick labels.
        let mut y = y_lo;
        while y <= y_hi + y_step * 1e-6 {
            cv.line((x0, py(y)), (x1, py(y)), 1, GRID, None);
            let label = tick_label(y, y_step);
            cv.text(x0 - 6 - Canvas::text_width(&label), py(y) - 4, &label, INK);
            y += y_step;
        }
        let mut x = 0.0;
        while x <= x_end + x_step * 1e-6 {
            cv.line((px(x), y0), (px(x), y1), 1, GRID, None);
            let label = tick_label(x, x_step);
            cv.text(px(x) - Canvas::text_width(&label) / 2, y1 + 6, &label, INK);
            x += x_step;
        }
        cv.line((x0, y0), (x0, y1), 1, INK, None);
        cv.line((x0, y1), (x1, y1), 1, INK, None);

        if let Some((value, label)) = &self.target {
            cv.line((x0, py(*value)), (x1, py(*value)), 1, TARGET, Some(4));
            // Inside the plot, above the line: the legend owns the right margin.
            cv.text(x0 + 6, py(*value) - 12, label, TARGET);
        }

        for (i, s) in self.series.iter().enumerate() {
            let colour = PALETTE[i % PALETTE.len()];
            let points: Vec<(i64, i64)> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| (px(x), py(y)))
                .collect();
            for pair in points.windows(2) {
                cv.line(pair[0], pair[1], 2, colour, None);
            }
            for &(x, y) in &points {
                cv.rect(x - 2, y - 2, 5, 5, colour);
            }
            // Legend, right of the plot.
            let ly = y0 + 8 + i as i64 * 16;
            cv.rect(x1 + 12, ly, 14, 4, colour);
            cv.text(x1 + 32, ly - 2, &s.label, INK);
        }

        cv.text(
            x0 + ((x1 - x0) - Canvas::text_width(&self.title)) / 2,
            12,
            &self.title,
            INK,
        );
        cv.text(
            x0 + ((x1 - x0) - Canvas::text_width(&self.x_label)) / 2,
            y1 + 26,
            &self.x_label,
            INK,
        );
        cv.text_vertical(12, (y0 + y1) / 2, &self.y_label, INK);
        cv.img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(tick_step(1.0, 5), 0.2);
        assert_eq!(tick_step(6000.0, 6), 1000.0);
        assert_eq!(tick_step(13000.0, 6), 5000.0);
        assert_eq!(tick_label(0.4, 0.2), "0.4");
        assert_eq!(tick_label(2000.0, 1000.0), "2000");
    }

    #[test]
    fn lines_are_drawn_in_their_colours() {
        let chart = Chart {
            title: "t".into(),
            x_label: "steps".into(),
            y_label: "rate".into(),
            y_range: (0.0, 1.0),
            target: Some((0.9, "goal".into())),
            series: vec![
                Series {
                    label: "a".into(),
                    points: vec![(0.0, 0.0), (100.0, 1.0)],
                },
                Series {
                    label: "b".into(),
                    points: vec![(0.0, 0.5), (100.0, 0.5)],
                },
            ],
        };
        let img = chart.render();
        let count = |c: Rgb<u8>| img.pixels().filter(|p| **p == c).count();
        // Series b is a horizontal line across the plot at y = 0.5.
        let mid_y = (TOP + (HEIGHT as i64 - BOTTOM)) / 2;
        let x = (LEFT + WIDTH as i64 - RIGHT) / 2;
        assert!((mid_y - 2..=mid_y + 2).any(|y| *img.get_pixel(x as u32, y as u32) == PALETTE[1]));
        assert!(count(PALETTE[0]) > 400, "the diagonal is drawn");
        assert!(count(TARGET) > 100, "the goal line is drawn");
        assert!(count(INK) > 500, "axes and labels are drawn");
    }
}
