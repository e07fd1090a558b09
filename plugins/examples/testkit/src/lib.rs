//! Nodes that misbehave on purpose, and nodes for measuring the call boundary.
//! The host's tests load this plugin to show that each misbehaviour ends in a
//! clean error naming plugin and node, and that the next run works.

use pixart_plugin_sdk::*;

struct Testkit;

impl Plugin for Testkit {
    fn info() -> PluginInfo {
        let image_out = |name: &str| {
            NodeDecl::new(name, 1).category("testing").output(
                "out",
                PortType::Image,
                "never produced",
            )
        };
        PluginInfo::new(
            "testkit",
            "0.1.0",
            "Hostile and benchmark nodes for the host's tests",
        )
        .node(image_out("hostile.spin").describe("Loops forever without calling the host"))
        .node(image_out("hostile.hog").describe("Allocates memory until it is stopped"))
        .node(image_out("hostile.panic").describe("Panics"))
        .node(
            image_out("hostile.read")
                .describe("Reads a file it was given no access to")
                .input(InputDecl::new("path", PortType::Text).default("secret.txt")),
        )
        .node(image_out("hostile.wrong_type").describe("Declares an image, returns an int"))
        .node(image_out("hostile.huge").describe("Makes tensors until it is stopped"))
        .node(
            NodeDecl::new("bench.noop", 1)
                .category("testing")
                .describe("Does nothing: the cost of a call")
                .output("out", PortType::Int, "0"),
        )
        .node(
            NodeDecl::new("bench.echo", 1)
                .category("testing")
                .describe(
                    "Reads a tensor into the plugin and writes it back: the cost of moving data",
                )
                .input(InputDecl::new("tensor", PortType::Tensor))
                .output("tensor", PortType::Tensor, "a copy made inside the plugin"),
        )
    }

    fn run(node: &str, mut inputs: Inputs) -> Result<Outputs, RunError> {
        match node {
            "hostile.spin" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "hostile.hog" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "hostile.panic" => panic!("the testkit panics on purpose"),
            "hostile.read" => {
                let path = inputs.text("path")?;
                let bytes = files::read_file(&path).map_err(RunError::Failed)?;
                Err(RunError::failed(format!(
                    "read {} bytes it should not have",
                    bytes.len()
                )))
            }
            "hostile.wrong_type" => Ok(Outputs::new().int("out", 7)),
            "hostile.huge" => {
                let chunk = vec![0.5f32; 4 << 20];
                let mut kept = Vec::new();
                loop {
                    kept.push(Tensor::new(&[chunk.len()], &chunk)?);
                }
            }
            "bench.noop" => Ok(Outputs::new().int("out", 0)),
            "bench.echo" => {
                let t = inputs.tensor("tensor")?;
                let data = t.to_f32();
                Ok(Outputs::new().tensor("tensor", Tensor::new(&t.dims(), &data)?))
            }
            _ => Err(RunError::unknown_node(node)),
        }
    }
}

plugin!(Testkit);
