pub mod echo;
pub mod netns;
pub mod process;
pub mod topology;
pub mod lbd;
