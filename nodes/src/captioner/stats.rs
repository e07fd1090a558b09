//! Caption statistics: how much a set of captions says ("concept density").
//!
//! The paper measures it as distinct nouns per image with a tagger; without
//! one we count distinct content words — lower-cased alphabetic words of three
//! or more letters that are not function words — per caption. It tracks nouns
//! and adjectives together, which is what relabelling adds.

use std::collections::HashSet;

/// Function words that carry no concept (articles, pronouns, prepositions,
/// auxiliaries, conjunctions, common adverbs).
const STOPWORDS: &[&str] = &[
    "the", "and", "are", "was", "were", "has", "have", "had", "with", "from", "this", "that",
    "these", "those", "its", "his", "her", "their", "our", "your", "for", "into", "onto", "over",
    "under", "there", "here", "which", "who", "whom", "whose", "what", "where", "when", "while",
    "also", "very", "some", "any", "each", "other", "such", "than", "then", "they", "them", "she",
    "him", "you", "not", "but", "can", "could", "would", "should", "will", "may", "might", "been",
    "being", "does", "did", "doing", "about", "above", "below", "between", "through", "during",
    "before", "after", "against", "within", "without", "along", "around", "near", "next", "both",
    "all", "one", "two", "image", "picture", "photo", "shows", "appears", "seems", "there's",
    "it's", "overall", "giving",
];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CaptionStats {
    pub captions: usize,
    pub mean_words: f64,
    /// Mean distinct content words per caption.
    pub mean_concepts: f64,
    /// Distinct content words over all captions.
    pub vocabulary: usize,
}

pub fn content_words(text: &str) -> HashSet<String> {
    text.split(|c: char| !c.is_alphabetic() && c != '\'')
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| w.chars().count() >= 3 && !STOPWORDS.contains(&w.as_str()))
        .collect()
}

pub fn stats<'a>(captions: impl IntoIterator<Item = &'a str>) -> CaptionStats {
    let mut s = CaptionStats::default();
    let mut all = HashSet::new();
    let (mut words, mut concepts) = (0usize, 0usize);
    for caption in captions {
        s.captions += 1;
        words += caption.split_whitespace().count();
        let c = content_words(caption);
        concepts += c.len();
        all.extend(c);
    }
    if s.captions > 0 {
        s.mean_words = words as f64 / s.captions as f64;
        s.mean_concepts = concepts as f64 / s.captions as f64;
    }
    s.vocabulary = all.len();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_captions_have_more_concepts() {
        let sparse = stats(["circle", "a square"]);
        let dense = stats([
            "A large red circle on the left and a small blue triangle at the top on a gray background.",
            "The image shows a small yellow square in the center; its style is flat and clean.",
        ]);
        assert_eq!(sparse.captions, 2);
        assert_eq!(sparse.mean_concepts, 1.0);
        assert!(dense.mean_concepts > 7.0, "{dense:?}");
        assert!(dense.mean_words > sparse.mean_words);
        assert_eq!(content_words("The the THE circle, circle!").len(), 1);
    }
}
