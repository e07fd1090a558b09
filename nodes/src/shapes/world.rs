//! The shapes world: scenes of one or two flat objects on a plain background,
//! their dense and sparse captions and class labels, and a rasteriser. Every
//! scene is a pure function of (seed, index), so a dataset is reproducible item
//! by item.

use crate::training::rng::{Stream, TrainRng};
use image::{Rgb, RgbImage};
use std::fmt;

macro_rules! attribute {
    ($name:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word(s) captions use for it.
            pub fn word(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }

            pub fn index(self) -> usize {
                self as usize
            }

            pub fn from_word(word: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.word() == word)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.word())
            }
        }
    };
}

attribute!(Shape { Circle => "circle", Square => "square", Triangle => "triangle", Ring => "ring" });

impl Shape {
    /// The world's shapes: what the default model learns. The ring is kept out
    /// of it (and out of its tokenizer's vocabulary) as the shape a LoRA
    /// teaches; the detector knows all four.
    pub const WORLD: &'static [Shape] = &[Shape::Circle, Shape::Square, Shape::Triangle];
}
attribute!(Colour {
    Red => "red", Green => "green", Blue => "blue",
    Yellow => "yellow", Purple => "purple", Orange => "orange",
});
attribute!(Size { Small => "small", Large => "large" });
attribute!(Position {
    Left => "on the left", Right => "on the right", Top => "at the top",
    Bottom => "at the bottom", Center => "in the center",
});
attribute!(Background { White => "white", Black => "black", Gray => "gray" });

impl Colour {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 180, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Yellow => [235, 210, 40],
            Colour::Purple => [140, 60, 190],
            Colour::Orange => [240, 140, 30],
        }
    }
}

impl Background {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::White => [245, 245, 245],
            Background::Black => [20, 20, 20],
            Background::Gray => [128, 128, 128],
        }
    }
}

impl Position {
    /// Where the object's centre sits, as fractions of the image's width and height.
    pub fn anchor(self) -> (f64, f64) {
        match self {
            Position::Left => (0.22, 0.5),
            Position::Right => (0.78, 0.5),
            Position::Top => (0.5, 0.22),
            Position::Bottom => (0.5, 0.78),
            Position::Center => (0.5, 0.5),
        }
    }
}

impl Size {
    /// The circle's radius as a fraction of the image's shorter side: a small
    /// object spans about a quarter of it, a large one about half.
    pub fn radius(self) -> f64 {
        match self {
            Size::Small => 0.11,
            Size::Large => 0.21,
        }
    }
}

/// Jitter bounds: an object's centre moves by up to this fraction of the side…
const POSITION_JITTER: f64 = 0.02;
/// …its size scales by up to ±this fraction…
const SIZE_JITTER: f64 = 0.08;
/// …and a triangle turns by up to this many radians (±15°).
const ROTATION_JITTER: f64 = 0.2618;
/// A ring's outer and inner radii, in circle radii: a band about as wide as a
/// small object's hole, so both survive the VAE at 64 px.
const RING_OUTER: f64 = 1.25;
const RING_INNER: f64 = 0.7;
/// Objects of a two-object scene keep at least this gap between their boxes.
const MIN_GAP: f64 = 0.03;

/// What a caption can say about one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub position: Position,
}

impl Object {
    /// "a large red circle on the left"
    pub fn phrase(&self) -> String {
        format!("{} {}", self.unplaced_phrase(), self.position)
    }

    /// "a large red circle": the phrase without where the object is.
    pub fn unplaced_phrase(&self) -> String {
        format!("a {} {} {}", self.size, self.colour, self.shape)
    }
}

/// An object as drawn: its attributes plus the jitter that makes each render differ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placed {
    pub object: Object,
    /// Centre, as fractions of width and height.
    pub centre: (f64, f64),
    /// Circle radius (square half-side and triangle circumradius derive from
    /// it), as a fraction of the shorter side.
    pub radius: f64,
    pub rotation: f64,
}

/// Half-extents (x, y) of a shape of circle-radius `r` turned by `rotation`,
/// measured from its centre.
fn half_extents(shape: Shape, r: f64, rotation: f64) -> (f64, f64) {
    match shape {
        Shape::Circle => (r, r),
        Shape::Ring => (RING_OUTER * r, RING_OUTER * r),
        Shape::Square => (0.9 * r, 0.9 * r),
        Shape::Triangle => {
            let (xs, ys) = triangle_vertices(r, rotation);
            let x = xs.iter().fold(0f64, |m, v| m.max(v.abs()));
            let y = ys.iter().fold(0f64, |m, v| m.max(v.abs()));
            (x, y)
        }
    }
}

/// An equilateral triangle pointing up, of about the circle's area.
fn triangle_vertices(r: f64, rotation: f64) -> ([f64; 3], [f64; 3]) {
    let circumradius = 1.2 * r;
    let mut xs = [0.0; 3];
    let mut ys = [0.0; 3];
    for k in 0..3 {
        let a =
            -std::f64::consts::FRAC_PI_2 + rotation + k as f64 * 2.0 * std::f64::consts::PI / 3.0;
        xs[k] = circumradius * a.cos();
        ys[k] = circumradius * a.sin();
    }
    (xs, ys)
}

impl Placed {
    fn new(object: Object, jitter: Option<&mut TrainRng>) -> Placed {
        let (mut cx, mut cy) = object.position.anchor();
        let mut radius = object.size.radius();
        let mut rotation = 0.0;
        if let Some(rng) = jitter {
            let mut signed = || 2.0 * rng.uniform() - 1.0;
            cx += POSITION_JITTER * signed();
            cy += POSITION_JITTER * signed();
            radius *= 1.0 + SIZE_JITTER * signed();
            if object.shape == Shape::Triangle {
                rotation = ROTATION_JITTER * signed();
            }
        }
        // Keep the whole object inside the frame (in the square; wider or taller
        // frames only add room along their longer side).
        let (ex, ey) = half_extents(object.shape, radius, rotation);
        Placed {
            object,
            centre: (cx.clamp(ex, 1.0 - ex), cy.clamp(ey, 1.0 - ey)),
            radius,
            rotation,
        }
    }

    /// The box it covers in the unit square: (x0, y0, x1, y1).
    fn bounds(&self) -> (f64, f64, f64, f64) {
        let (ex, ey) = half_extents(self.object.shape, self.radius, self.rotation);
        let (cx, cy) = self.centre;
        (cx - ex, cy - ey, cx + ex, cy + ey)
    }

    fn apart_from(&self, other: &Placed) -> bool {
        let a = self.bounds();
        let b = other.bounds();
        let gap_x = (b.0 - a.2).max(a.0 - b.2);
        let gap_y = (b.1 - a.3).max(a.1 - b.3);
        gap_x >= MIN_GAP || gap_y >= MIN_GAP
    }

    /// Whether the point (u, v) of a `w`×`h` frame (fractions) lies inside.
    fn covers(&self, u: f64, v: f64, w: f64, h: f64) -> bool {
        let side = w.min(h);
        let dx = (u - self.centre.0) * w / side;
        let dy = (v - self.centre.1) * h / side;
        let r = self.radius;
        match self.object.shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Ring => {
                let d2 = dx * dx + dy * dy;
                d2 <= (RING_OUTER * r).powi(2) && d2 >= (RING_INNER * r).powi(2)
            }
            Shape::Square => dx.abs() <= 0.9 * r && dy.abs() <= 0.9 * r,
            Shape::Triangle => {
                let (xs, ys) = triangle_vertices(r, self.rotation);
                let mut sign = 0.0f64;
                for k in 0..3 {
                    let (x0, y0, x1, y1) = (xs[k], ys[k], xs[(k + 1) % 3], ys[(k + 1) % 3]);
                    let cross = (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0);
                    if cross != 0.0 {
                        if sign != 0.0 && cross.signum() != sign {
                            return false;
                        }
                        sign = cross.signum();
                    }
                }
                true
            }
        }
    }
}

/// The objects that can share a scene with `first`: another colour, another
/// place, and room between them.
fn partners_of(first: Object, allowed: &[Combo]) -> Vec<Object> {
    let nominal_first = Placed::new(first, None);
    allowed
        .iter()
        .flat_map(|&(colour, shape, position)| {
            Size::ALL.iter().map(move |&size| Object {
                shape,
                colour,
                size,
                position,
            })
        })
        .filter(|o| o.position != first.position && o.colour != first.colour)
        .filter(|o| Placed::new(*o, None).apart_from(&nominal_first))
        .collect()
}

/// A colour-shape-position combination (size and background are free).
pub type Combo = (Colour, Shape, Position);

/// The 13 of the 90 colour-shape-position combinations that training never
/// shows, in either object, so evaluation can test composition. Every colour,
/// shape and position still appears in training, in other combinations.
pub fn held_out(combo: Combo) -> bool {
    let (c, s, p) = combo;
    (c.index() + 3 * s.index() + 2 * p.index()) % 7 == 0
}

/// Every colour-shape-position combination of the world's shapes.
pub fn all_combos() -> Vec<Combo> {
    combos_of(Shape::WORLD)
}

/// Every colour-position combination of these shapes.
pub fn combos_of(shapes: &[Shape]) -> Vec<Combo> {
    let mut out = Vec::new();
    for &c in Colour::ALL {
        for &s in shapes {
            for &p in Position::ALL {
                out.push((c, s, p));
            }
        }
    }
    out
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub objects: Vec<Placed>,
    pub background: Background,
}

/// How scenes are drawn from the world.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub seed: u64,
    /// Probability that a scene has two objects.
    pub two_objects: f64,
    /// Leave the held-out combinations out.
    pub holdout: bool,
    /// A shape outside the world (the ring) and the probability that a
    /// scene's first object takes it: the data a LoRA learns a new shape from.
    pub new_shape: Option<(Shape, f64)>,
}

impl Scene {
    /// Scene number `index` of the world drawn with `sampling`.
    pub fn sample(sampling: &Sampling, index: u64) -> Scene {
        let mut rng = TrainRng::new(sampling.seed, Stream::World, index);
        let background = Background::ALL[rng.below(3) as usize];
        let allowed: Vec<Combo> = all_combos()
            .into_iter()
            .filter(|c| !(sampling.holdout && held_out(*c)))
            .collect();
        let draw = |rng: &mut TrainRng| {
            let (colour, shape, position) = allowed[rng.below(allowed.len() as u64) as usize];
            let size = Size::ALL[rng.below(2) as usize];
            Object {
                shape,
                colour,
                size,
                position,
            }
        };
        let mut first = draw(&mut rng);
        // Drawn only with a new shape, so the world's own scenes stay as they were.
        if let Some((shape, share)) = sampling.new_shape {
            if rng.uniform() < share {
                first.shape = shape;
            }
        }
        if rng.uniform() >= sampling.two_objects {
            return Scene {
                objects: vec![Placed::new(first, Some(&mut rng))],
                background,
            };
        }
        // Second objects that fit beside the first without jitter (a large
        // centred first object leaves no room: draw another first object);
        // jittered placements are then tried a bounded number of times, falling
        // back to the unjittered ones, which fit by construction.
        let mut partners = Vec::new();
        for _ in 0..8 {
            partners = partners_of(first, &allowed);
            if !partners.is_empty() {
                break;
            }
            let shape = first.shape;
            first = draw(&mut rng);
            if sampling.new_shape.is_some_and(|(s, _)| s == shape) {
                first.shape = shape;
            }
        }
        if partners.is_empty() {
            return Scene {
                objects: vec![Placed::new(first, Some(&mut rng))],
                background,
            };
        }
        let nominal_first = Placed::new(first, None);
        let second = partners[rng.below(partners.len() as u64) as usize];
        for _ in 0..16 {
            let a = Placed::new(first, Some(&mut rng));
            let b = Placed::new(second, Some(&mut rng));
            if a.apart_from(&b) {
                return Scene {
                    objects: vec![a, b],
                    background,
                };
            }
        }
        Scene {
            objects: vec![nominal_first, Placed::new(second, None)],
            background,
        }
    }

    /// A scene of exactly these objects, as an evaluation prompt describes it,
    /// jittered by `seed`.
    pub fn of(objects: &[Object], background: Background, seed: u64) -> Scene {
        let mut rng = TrainRng::new(seed, Stream::World, u64::MAX);
        Scene {
            objects: objects
                .iter()
                .map(|o| Placed::new(*o, Some(&mut rng)))
                .collect(),
            background,
        }
    }

    pub fn render(&self, width: u32, height: u32) -> RgbImage {
        let (w, h) = (width as f64, height as f64);
        RgbImage::from_fn(width, height, |x, y| {
            let u = (x as f64 + 0.5) / w;
            let v = (y as f64 + 0.5) / h;
            // Later objects are drawn over earlier ones (they never overlap by construction).
            let rgb = self
                .objects
                .iter()
                .rev()
                .find(|o| o.covers(u, v, w, h))
                .map(|o| o.object.colour.rgb())
                .unwrap_or(self.background.rgb());
            Rgb(rgb)
        })
    }

    /// "a large red circle on the left and a small blue triangle at the top on a gray background"
    pub fn dense_caption(&self) -> String {
        caption(
            &self.objects.iter().map(|p| p.object).collect::<Vec<_>>(),
            self.background,
        )
    }

    /// The dense caption without the objects' positions ("a large red circle
    /// on a white background"): what a ControlNet learns to place from its
    /// control image alone.
    pub fn unplaced_caption(&self) -> String {
        unplaced_caption(
            &self.objects.iter().map(|p| p.object).collect::<Vec<_>>(),
            self.background,
        )
    }

    /// What a web alt-text might say: the first object's shape, sometimes with
    /// its colour or position, never the rest of the scene.
    pub fn sparse_caption(&self, seed: u64, index: u64) -> String {
        let mut rng = TrainRng::new(seed, Stream::Caption, index);
        let o = self.objects[0].object;
        let mut text = String::new();
        if rng.uniform() < 0.5 {
            text.push_str(o.colour.word());
            text.push(' ');
        }
        text.push_str(o.shape.word());
        if rng.uniform() < 0.5 {
            text.push(' ');
            text.push_str(o.position.word());
        }
        text
    }

    /// The class of class-conditional pre-training: the first object's shape.
    pub fn label(&self) -> &'static str {
        self.objects[0].object.shape.word()
    }
}

/// The dense caption of these objects on this background.
pub fn caption(objects: &[Object], background: Background) -> String {
    let phrases: Vec<String> = objects.iter().map(Object::phrase).collect();
    format!("{} on a {} background", phrases.join(" and "), background)
}

/// The dense caption of these objects without their positions.
pub fn unplaced_caption(objects: &[Object], background: Background) -> String {
    let phrases: Vec<String> = objects.iter().map(Object::unplaced_phrase).collect();
    format!("{} on a {} background", phrases.join(" and "), background)
}

/// Reads a dense caption back into objects and background; `None` if the
/// text is not a sentence of the grammar.
pub fn parse_caption(text: &str) -> Option<(Vec<Object>, Background)> {
    let text = text.trim();
    let (body, bg) = text.strip_suffix(" background")?.rsplit_once(" on a ")?;
    let background = Background::from_word(bg)?;
    let mut objects = Vec::new();
    for phrase in body.split(" and ") {
        let rest = phrase.strip_prefix("a ")?;
        let mut words = rest.splitn(4, ' ');
        let size = Size::from_word(words.next()?)?;
        let colour = Colour::from_word(words.next()?)?;
        let shape = Shape::from_word(words.next()?)?;
        let position = Position::from_word(words.next()?)?;
        objects.push(Object {
            shape,
            colour,
            size,
            position,
        });
    }
    if objects.is_empty() || objects.len() > 2 {
        return None;
    }
    Some((objects, background))
}

/// Every word a caption of this world can use (for training its tokenizer).
pub fn vocabulary() -> Vec<&'static str> {
    let mut words: Vec<&'static str> = vec!["a", "and", "on", "background"];
    words.extend(Shape::WORLD.iter().map(|s| s.word()));
    words.extend(Colour::ALL.iter().map(|s| s.word()));
    words.extend(Size::ALL.iter().map(|s| s.word()));
    words.extend(Background::ALL.iter().map(|s| s.word()));
    for p in Position::ALL {
        words.extend(p.word().split(' '));
    }
    words.sort();
    words.dedup();
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(two: f64) -> Sampling {
        Sampling {
            seed: 3,
            two_objects: two,
            holdout: true,
            new_shape: None,
        }
    }

    #[test]
    fn thirteen_combinations_are_held_out_and_every_value_still_trains() {
        let held: Vec<Combo> = all_combos().into_iter().filter(|c| held_out(*c)).collect();
        assert_eq!(held.len(), 13);
        let kept: Vec<Combo> = all_combos().into_iter().filter(|c| !held_out(*c)).collect();
        for c in Colour::ALL {
            assert!(kept.iter().any(|k| k.0 == *c));
        }
        for p in Position::ALL {
            assert!(kept.iter().any(|k| k.2 == *p));
        }
    }

    #[test]
    fn scenes_are_deterministic_valid_and_captioned() {
        for i in 0..400 {
            let s = Scene::sample(&sampling(0.5), i);
            assert_eq!(s, Scene::sample(&sampling(0.5), i));
            for o in &s.objects {
                assert!(!held_out((
                    o.object.colour,
                    o.object.shape,
                    o.object.position
                )));
                let (x0, y0, x1, y1) = o.bounds();
                assert!(x0 >= -1e-9 && y0 >= -1e-9 && x1 <= 1.0 + 1e-9 && y1 <= 1.0 + 1e-9);
            }
            if s.objects.len() == 2 {
                assert!(s.objects[0].apart_from(&s.objects[1]));
            }
            let (objects, bg) = parse_caption(&s.dense_caption()).unwrap();
            assert_eq!(bg, s.background);
            assert_eq!(
                objects,
                s.objects.iter().map(|p| p.object).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn every_first_object_finds_a_partner_in_two_object_scenes() {
        let two = (0..300)
            .filter(|&i| Scene::sample(&sampling(1.0), i).objects.len() == 2)
            .count();
        assert!(two > 280, "{two} of 300 scenes had two objects");
    }

    #[test]
    fn renders_have_the_objects_colours() {
        let s = Scene::sample(&sampling(0.0), 5);
        let img = s.render(64, 48);
        assert_eq!(img.dimensions(), (64, 48));
        let colour = s.objects[0].object.colour.rgb();
        assert!(img.pixels().filter(|p| p.0 == colour).count() > 50);
    }
}
