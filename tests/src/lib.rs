pub mod docker;
pub mod echo;
pub mod fixture;
pub mod lbd;
pub mod netns;
pub mod process;
pub mod topology;
